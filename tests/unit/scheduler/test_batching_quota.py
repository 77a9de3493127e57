"""Prefill batches respect the compute quota, chunking by binary search (paper section 6.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath_engine.scheduler import batching

pytestmark = pytest.mark.timeout(60)


def linear(cached: int, bsz: int) -> float:
    """1/1024 s per new token (exact in binary floating point), cached tokens free."""
    return bsz / 1024


QUOTA = 300 / 1024


def item(request_id: str, remaining: int, cached: int = 0) -> batching.PrefillItem:
    return batching.PrefillItem(request_id=request_id, cached=cached, remaining=remaining)


def shape(batch: tuple[batching.BatchEntry, ...]) -> list[tuple[str, int, bool]]:
    return [(e.request_id, e.bsz, e.chunked) for e in batch]


@pytest.mark.parametrize(
    ("case", "queue", "expected"),
    [
        (
            "whole requests while they fit",
            [item("a", 100), item("b", 150)],
            [("a", 100, False), ("b", 150, False)],
        ),
        ("exactly at the quota is allowed", [item("a", 300)], [("a", 300, False)]),
        ("one token over is chunked", [item("a", 301)], [("a", 300, True)]),
        (
            "the first request that does not fit is chunked and ends the batch",
            [item("a", 200), item("b", 250), item("c", 10)],
            [("a", 200, False), ("b", 100, True)],
        ),
        ("a full quota leaves no room for a chunk", [item("a", 300), item("b", 5)], [("a", 300, False)]),
        ("finished requests are skipped", [item("done", 0), item("a", 5)], [("a", 5, False)]),
    ],
)
def test_quota_table(
    case: str, queue: list[batching.PrefillItem], expected: list[tuple[str, int, bool]]
) -> None:
    assert shape(batching.build_prefill_batch(queue, linear, QUOTA)) == expected, case


def test_cached_tokens_make_chunks_smaller() -> None:
    model = batching.AttentionTimeModel(per_pair_seconds=1e-6)
    cold = batching.build_prefill_batch([item("a", 10_000)], model, 0.300)
    warm = batching.build_prefill_batch([item("a", 10_000, cached=50_000)], model, 0.300)
    assert cold[0].bsz > warm[0].bsz > 0
    assert warm[0].predicted_seconds <= 0.300


def test_a_head_request_too_expensive_for_one_token_still_progresses() -> None:
    batch = batching.build_prefill_batch([item("huge", 10)], lambda c, b: 1.0 * b, 0.300, min_chunk=1)
    assert shape(batch) == [("huge", 1, True)]


def test_largest_chunk_boundaries() -> None:
    assert batching.largest_chunk(linear, 0, 1000, 0.0, 0.0) == 0
    assert batching.largest_chunk(linear, 0, 1000, 0.0, 10.0) == 1000
    assert batching.largest_chunk(linear, 0, 1000, 100 / 1024, QUOTA) == 200
    assert batching.largest_chunk(linear, 0, 0, 0.0, 1.0) == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 3000)), max_size=12),
    st.floats(0.01, 1.0),
    st.floats(0, 1e-3),
    st.floats(0, 1e-7),
)
def test_property_quota_kept_fifo_and_chunk_maximal(
    specs: list[tuple[int, int]], quota: float, per_token: float, per_pair: float
) -> None:
    model = batching.AttentionTimeModel(per_token_seconds=per_token, per_pair_seconds=per_pair)
    queue = [item(f"r{i}", remaining, cached) for i, (cached, remaining) in enumerate(specs)]
    batch = batching.build_prefill_batch(queue, model, quota, min_chunk=1)
    live = [q for q in queue if q.remaining > 0]
    assert [e.request_id for e in batch] == [q.request_id for q in live[: len(batch)]]
    total = sum(e.predicted_seconds for e in batch)
    forced = len(batch) == 1 and batch[0].bsz == 1 and model(batch[0].cached, 1) > quota
    assert forced or total <= quota * (1 + 1e-9)
    assert all(not e.chunked for e in batch[:-1])
    if batch and batch[-1].chunked and not forced:
        last = batch[-1]
        before = total - last.predicted_seconds
        assert before + model(last.cached, last.bsz + 1) > quota  # the chunk is the largest that fits
