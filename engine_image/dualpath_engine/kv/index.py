"""Prefix index: which Full Blocks are known, keyed by chained hash, with reference counts.

A trie over blocks: each entry points to its parent (the previous block of the same prefix, or the
chain root) and knows its children, so :meth:`PrefixIndex.longest_prefix` walks a token sequence's
chain until the first unknown block. Entries in use are pinned by reference counts
(:meth:`acquire` / :meth:`release`); only unreferenced leaves are evicted, least recently used (or
released) first, in O(1) each; a release without a matching acquire raises instead of going negative
(no double free).

Used by engines to remember what storage holds (and what is being read) and by the scheduler to
estimate hit lengths; it never touches storage itself.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

from dualpath_engine.kv import hashing


class DoubleReleaseError(RuntimeError):
    """A block was released more often than it was acquired."""


@dataclasses.dataclass
class _Entry:
    parent: hashing.BlockHash
    refs: int = 0
    doomed: bool = False
    children: set[hashing.BlockHash] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class PrefixMatch:
    """Result of a prefix lookup."""

    hashes: tuple[hashing.BlockHash, ...]
    """Known blocks from the start of the sequence, in order."""
    tokens: int
    """Tokens covered by ``hashes`` (``len(hashes) * block_tokens``)."""


class PrefixIndex:
    """In-memory trie of known Full Blocks with reference counts and LRU eviction of free leaves."""

    def __init__(
        self, block_tokens: int, root: hashing.BlockHash, capacity_blocks: int | None = None
    ) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if capacity_blocks is not None and capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1 or None, got {capacity_blocks}")
        self._block_tokens = block_tokens
        self._root = root
        self._capacity = capacity_blocks
        self._entries: dict[hashing.BlockHash, _Entry] = {}
        self._root_children: set[hashing.BlockHash] = set()
        # Unreferenced leaves, least recently used first: the only eviction candidates.
        self._free_leaves: collections.OrderedDict[hashing.BlockHash, None] = collections.OrderedDict()

    @property
    def block_tokens(self) -> int:
        """Tokens per Full Block."""
        return self._block_tokens

    @property
    def root(self) -> hashing.BlockHash:
        """Chain root of this index's namespace."""
        return self._root

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block: object) -> bool:
        entry = self._entries.get(block) if isinstance(block, bytes) else None
        return entry is not None and not entry.doomed

    def __iter__(self) -> Iterator[hashing.BlockHash]:
        return iter(list(self._entries))

    def hashes_for(self, tokens: Sequence[int]) -> list[hashing.BlockHash]:
        """Chained hashes of the Full Blocks of ``tokens`` in this index's namespace."""
        return hashing.chain_hashes(tokens, self._block_tokens, self._root)

    def longest_prefix(self, tokens: Sequence[int]) -> PrefixMatch:
        """Known leading blocks of ``tokens`` (stops at the first unknown block)."""
        return self.longest_known(self.hashes_for(tokens))

    def longest_known(self, chain: Sequence[hashing.BlockHash]) -> PrefixMatch:
        """Known leading blocks of an already hashed chain (which must start at the root)."""
        hits: list[hashing.BlockHash] = []
        for block in chain:
            entry = self._entries.get(block)
            if entry is None or entry.doomed:
                break
            if block in self._free_leaves:
                self._free_leaves.move_to_end(block)
            hits.append(block)
        return PrefixMatch(hashes=tuple(hits), tokens=len(hits) * self._block_tokens)

    def insert(self, chain: Sequence[hashing.BlockHash]) -> list[hashing.BlockHash]:
        """Record a chain of blocks starting at the root; returns the blocks evicted to stay in capacity."""
        parent = self._root
        added = 0
        for block in chain:
            entry = self._entries.get(block)
            if entry is None:
                entry = _Entry(parent=parent)
                self._entries[block] = entry
                self._children_of(parent).add(block)
                self._free_leaves.pop(parent, None)  # no longer a leaf
                added += 1
            elif entry.parent != parent:
                raise ValueError(f"block {block.hex()} is already known under another parent")
            entry.doomed = False
            self._refresh(block)
            parent = block
        if self._capacity is None or added == 0:
            return []
        return self.evict(max(0, len(self._entries) - self._capacity), protect=set(chain))

    def acquire(self, blocks: Sequence[hashing.BlockHash]) -> None:
        """Pin blocks (all of them or none): each must be known."""
        missing = [block.hex() for block in blocks if block not in self]
        if missing:
            raise KeyError(f"cannot acquire unknown blocks: {', '.join(missing)}")
        for block in blocks:
            self._entries[block].refs += 1
            self._free_leaves.pop(block, None)

    def release(self, blocks: Sequence[hashing.BlockHash]) -> None:
        """Unpin blocks (all of them or none); raises :class:`DoubleReleaseError` on an unbalanced release."""
        wanted: dict[hashing.BlockHash, int] = {}
        for block in blocks:
            wanted[block] = wanted.get(block, 0) + 1
        for block, count in wanted.items():
            entry = self._entries.get(block)
            held = entry.refs if entry is not None else 0
            if held < count:
                raise DoubleReleaseError(f"block {block.hex()} released {count}x but held {held}x")
        for block, count in wanted.items():
            entry = self._entries[block]
            entry.refs -= count
            if entry.refs == 0 and entry.doomed:
                self._remove_doomed(block)
            else:
                self._refresh(block)

    def refcount(self, block: hashing.BlockHash) -> int:
        """Current pins of a block (0 when unknown)."""
        entry = self._entries.get(block)
        return entry.refs if entry is not None else 0

    def evict(self, count: int, protect: set[hashing.BlockHash] | None = None) -> list[hashing.BlockHash]:
        """Remove up to ``count`` unreferenced leaves, least recently used first; returns them."""
        evicted: list[hashing.BlockHash] = []
        protect = protect or set()
        skipped: list[hashing.BlockHash] = []
        while len(evicted) < count and self._free_leaves:
            block, _ = self._free_leaves.popitem(last=False)
            if block in protect:
                skipped.append(block)
                continue
            self._remove(block)  # may turn the parent into a free leaf (appended as most recent)
            evicted.append(block)
        for block in reversed(skipped):
            self._free_leaves[block] = None
            self._free_leaves.move_to_end(block, last=False)
        return evicted

    def discard(self, block: hashing.BlockHash) -> None:
        """Forget a block and its descendants (e.g. storage found it corrupt); pinned ones go on release."""
        if block not in self._entries:
            return
        stack = [block]
        subtree: list[hashing.BlockHash] = []
        while stack:
            current = stack.pop()
            subtree.append(current)
            stack.extend(self._entries[current].children)
        for current in subtree:
            self._entries[current].doomed = True
        for current in reversed(subtree):
            entry = self._entries.get(current)
            if entry is not None and entry.refs == 0 and not entry.children:
                self._remove_doomed(current)

    def _children_of(self, parent: hashing.BlockHash) -> set[hashing.BlockHash]:
        if parent == self._root:
            return self._root_children
        return self._entries[parent].children

    def _refresh(self, block: hashing.BlockHash) -> None:
        """Make ``block`` the most recent free leaf if it is one."""
        entry = self._entries[block]
        if entry.refs == 0 and not entry.children and not entry.doomed:
            self._free_leaves[block] = None
            self._free_leaves.move_to_end(block)
        else:
            self._free_leaves.pop(block, None)

    def _remove(self, block: hashing.BlockHash) -> None:
        entry = self._entries.pop(block)
        self._free_leaves.pop(block, None)
        if entry.parent == self._root:
            self._root_children.discard(block)
        elif entry.parent in self._entries:
            self._entries[entry.parent].children.discard(block)
            self._refresh(entry.parent)

    def _remove_doomed(self, block: hashing.BlockHash) -> None:
        # Remove a doomed unreferenced leaf, then walk up while parents are doomed, free leaves too.
        current: hashing.BlockHash | None = block
        while current is not None:
            entry = self._entries.get(current)
            if entry is None or not entry.doomed or entry.refs or entry.children:
                return
            self._remove(current)
            current = entry.parent if entry.parent != self._root else None
