"""Prefix index: longest-prefix hits, reference counts that never go negative, safe eviction."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dualpath_engine.kv import hashing, index

pytestmark = pytest.mark.timeout(60)

ROOT = hashing.root_hash("index-test")
BLOCK = 4


def make() -> index.PrefixIndex:
    return index.PrefixIndex(BLOCK, ROOT)


def test_longest_prefix_stops_at_first_unknown_block_and_ignores_partial_tail() -> None:
    idx = make()
    prompt = list(range(14))  # three full blocks + 2 tokens
    idx.insert(idx.hashes_for(prompt[:8]))
    match = idx.longest_prefix(prompt)
    assert match.tokens == 8 and match.hashes == tuple(idx.hashes_for(prompt)[:2])
    # A later turn of the same session extends the hit.
    idx.insert(idx.hashes_for(prompt))
    assert idx.longest_prefix([*prompt, 99, 98]).tokens == 12
    # A prompt that diverges in the first block hits nothing.
    assert idx.longest_prefix([7, *prompt[1:]]).tokens == 0


def test_release_without_acquire_is_refused_and_changes_nothing() -> None:
    idx = make()
    chain = idx.hashes_for(list(range(8)))
    idx.insert(chain)
    idx.acquire(chain[:1])
    with pytest.raises(index.DoubleReleaseError):
        idx.release([chain[0], chain[0]])
    assert idx.refcount(chain[0]) == 1
    idx.release([chain[0]])
    with pytest.raises(index.DoubleReleaseError):
        idx.release([chain[0]])
    assert idx.refcount(chain[0]) == 0
    with pytest.raises(KeyError, match="unknown"):
        idx.acquire([hashing.root_hash("elsewhere")])


def test_capacity_evicts_least_recently_used_free_leaves_only() -> None:
    idx = index.PrefixIndex(BLOCK, ROOT, capacity_blocks=3)
    a = idx.hashes_for([1] * 8)
    b = idx.hashes_for([2] * 4)
    idx.insert(a)
    idx.acquire(a)
    idx.insert(b)
    c = idx.hashes_for([3] * 4)
    evicted = idx.insert(c)  # over capacity: a is pinned, c is new, so b goes
    assert evicted == [b[0]]
    assert idx.longest_prefix([1] * 8).tokens == 8


def test_eviction_order_is_least_recently_used_and_parents_follow_their_children() -> None:
    idx = make()
    a, b, c = (idx.hashes_for([n] * 8) for n in (1, 2, 3))
    for chain in (a, b, c):
        idx.insert(chain)
    idx.longest_prefix([1] * 8)  # a is used again
    assert idx.evict(2) == [b[1], c[1]]  # the oldest free leaves
    assert idx.evict(1) == [a[1]]  # b[0] and c[0] became free leaves only after a was touched
    assert set(idx.evict(10)) == {a[0], b[0], c[0]}
    assert len(idx) == 0


def test_large_index_stays_fast_at_capacity() -> None:
    idx = index.PrefixIndex(BLOCK, ROOT, capacity_blocks=20_000)
    for n in range(30_000):
        idx.insert([hashing.block_hash(ROOT, [n, n, n, n])])
    assert len(idx) == 20_000
    assert idx.longest_prefix([29_999] * 4).tokens == 4
    assert idx.longest_prefix([0] * 4).tokens == 0


def test_discard_forgets_a_block_and_its_descendants_after_their_last_release() -> None:
    idx = make()
    chain = idx.hashes_for(list(range(12)))
    idx.insert(chain)
    idx.acquire(chain[2:])
    idx.discard(chain[1])
    assert idx.longest_prefix(list(range(12))).tokens == 4
    assert chain[2] not in idx
    idx.release(chain[2:])
    assert len(idx) == 1


class IndexMachine(RuleBasedStateMachine):
    """Random inserts, pins, unpins, evictions and discards against a simple model of pin counts."""

    def __init__(self) -> None:
        super().__init__()
        self.idx = index.PrefixIndex(BLOCK, ROOT, capacity_blocks=12)
        self.pins: dict[bytes, int] = {}

    @rule(tokens=st.lists(st.integers(0, 2), min_size=BLOCK, max_size=BLOCK * 4))
    def insert(self, tokens: list[int]) -> None:
        evicted = self.idx.insert(self.idx.hashes_for(tokens))
        assert not any(self.pins.get(block, 0) for block in evicted)

    @rule(tokens=st.lists(st.integers(0, 2), min_size=BLOCK, max_size=BLOCK * 4))
    def acquire_prefix(self, tokens: list[int]) -> None:
        hit = self.idx.longest_prefix(tokens).hashes
        self.idx.acquire(list(hit))
        for block in hit:
            self.pins[block] = self.pins.get(block, 0) + 1

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def release_one(self, data: st.DataObject) -> None:
        held = sorted(block for block, count in self.pins.items() if count)
        block = data.draw(st.sampled_from(held))
        self.idx.release([block])
        self.pins[block] -= 1

    @rule(data=st.data())
    def release_too_many(self, data: st.DataObject) -> None:
        known = sorted(iter(self.idx)) or [hashing.root_hash("nothing")]
        block = data.draw(st.sampled_from(known))
        extra = self.pins.get(block, 0) + 1
        with pytest.raises(index.DoubleReleaseError):
            self.idx.release([block] * extra)

    @rule(count=st.integers(0, 5))
    def evict(self, count: int) -> None:
        evicted = self.idx.evict(count)
        assert len(evicted) <= count
        assert not any(self.pins.get(block, 0) for block in evicted)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        known = sorted(iter(self.idx))
        if known:
            self.idx.discard(data.draw(st.sampled_from(known)))

    @invariant()
    def refcounts_match_and_are_never_negative(self) -> None:
        for block, count in self.pins.items():
            assert count >= 0
            assert self.idx.refcount(block) == count
        for block in iter(self.idx):
            assert self.idx.refcount(block) >= 0

    @invariant()
    def pinned_blocks_are_never_dropped(self) -> None:
        known = set(iter(self.idx))
        assert all(block in known for block, count in self.pins.items() if count)


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
