"""The one owner of KV pages: a refcounted block allocator with prefix caching.

Requests hold block ids; only this allocator hands them out and takes them back. Full
pages are keyed by a hash chain (`page_hashes`) so a later request with the same
prefix reuses them. A page whose last holder freed it stays cached ("evictable")
until its space is needed. Every public method takes one lock, so the prefill and
the decode worker may call it at the same time.

A page may be published "pending": before the iteration that writes its KV is queued, so that a request planned
later into the same iteration hits it (in every layer, a forward pass writes the new K/V of the whole batch into
the pool before attention reads it). A pending page is held; it is `settle`d once that iteration is queued, or
`withdraw`n if it never will be, and so never sits in the cache unheld.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

_DIGEST_BYTES = 32
_ROOT = hashlib.sha256(b"semipd/kv-page-chain/v1").digest()
_PAGE_TAG, _SALT_TAG = b"P", b"S"  # distinct first bytes: a salted root is never a page's key


def page_hashes(token_ids: Sequence[int], page_size: int, known: Sequence[int] = (), salt: str | None = None
                ) -> list[int]:
    """Hash chain over the full pages of `token_ids`: h[i] = sha256(h[i-1], page i), from a root that
    `salt` changes (chains of different salts share no page).

    A key is a SHA-256 digest (as an int), like vLLM's: a prompt cannot be crafted to collide with another's
    pages and be served their KV (Python's 64-bit `hash` is public and not collision resistant).
    `known` is a prefix of the chain already computed; it is extended, not recomputed.
    """
    hashes = list(known)
    parent = hashes[-1].to_bytes(_DIGEST_BYTES, "big") if hashes else _root(salt)
    for start in range(len(hashes) * page_size, len(token_ids) - page_size + 1, page_size):
        parent = hashlib.sha256(_PAGE_TAG + parent + _token_bytes(token_ids[start : start + page_size])).digest()
        hashes.append(int.from_bytes(parent, "big"))
    return hashes


def _token_bytes(tokens: Sequence[int]) -> bytes:
    """The tokens as 8-byte little-endian ints (the same bytes on every host)."""
    packed = array("q", tokens)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def _root(salt: str | None) -> bytes:
    """The chain's root digest; stable across processes. Any str is a salt, lone surrogates included (a strict
    encode would raise in the scheduler, at every iteration)."""
    if salt is None:
        return _ROOT
    return hashlib.sha256(_SALT_TAG + _ROOT + salt.encode("utf-8", "surrogatepass")).digest()


class BlockAllocator:
    """Allocates fixed-size KV pages by id; all-or-nothing, refcounted, thread-safe."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._lock = threading.Lock()
        self._refcount = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # refcount 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0, hashed, LRU first
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}
        self._pending: set[int] = set()  # published, held, their KV's iteration not queued yet
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free(self) -> int:
        """Pages that `allocate` can hand out now (free plus evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of pages held by requests, in [0, 1]."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh pages with refcount 1, or None (and nothing taken) if too few are free."""
        with self._lock:
            if n > len(self._free) + len(self._evictable):
                return None
            blocks = []
            for _ in range(n):
                if self._free:
                    b = self._free.popleft()
                else:
                    b, _ = self._evictable.popitem(last=False)
                    del self._hash_to_block[self._block_to_hash.pop(b)]
                self._refcount[b] = 1
                blocks.append(b)
            return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Add one holder to each of `blocks` (which must be held already)."""
        with self._lock:
            for b in blocks:
                assert self._refcount[b] > 0, f"share of unheld block {b}"
                self._refcount[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one holder from each of `blocks`; pages nobody holds become reusable.

        Pages are released in reverse so that, among cached pages, a chain's tail is
        evicted before its head (the head is the likelier prefix hit).
        """
        with self._lock:
            for b in reversed(list(blocks)):
                assert self._refcount[b] > 0, f"double free of block {b}"
                self._refcount[b] -= 1
                if self._refcount[b] == 0:
                    if b in self._block_to_hash:
                        self._evictable[b] = None
                    else:
                        self._free.append(b)

    def match_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Take a hold on the longest run of cached pages matching `hashes` from the start."""
        if not self.enable_prefix_caching:
            return []
        with self._lock:
            self.prefix_queries += len(hashes)
            hit = []
            for h in hashes:
                b = self._hash_to_block.get(h)
                if b is None:
                    break
                hit.append(b)
            for b in hit:
                if self._refcount[b] == 0:
                    del self._evictable[b]
                self._refcount[b] += 1
            self.prefix_hits += len(hit)
            return hit

    def cache(self, block: int, h: int, pending: bool = False) -> None:
        """Publish a held page under hash `h` for later prefix hits: fully written, or (`pending`) to be written by
        the iteration being planned, which every request that hits it before `settle` joins.

        If another page already carries `h` (two requests computed the same prefix at
        once), this one stays private.
        """
        if not self.enable_prefix_caching:
            return
        with self._lock:
            assert self._refcount[block] > 0, f"cache of unheld block {block}"
            if h in self._hash_to_block or block in self._block_to_hash:
                return
            self._hash_to_block[h] = block
            self._block_to_hash[block] = h
            if pending:
                self._pending.add(block)

    def settle(self, blocks: Iterable[int]) -> None:
        """The iteration that writes `blocks` is queued: those of them published pending are plain cached pages."""
        with self._lock:
            self._pending.difference_update(blocks)

    def withdraw(self, blocks: Iterable[int]) -> None:
        """The iteration that was to write `blocks` will not run: those of them published pending leave the prefix
        cache (the others are untouched). Their holders keep them; a request that hit one must not run either."""
        with self._lock:
            for b in blocks:
                if b in self._pending:
                    self._pending.remove(b)
                    del self._hash_to_block[self._block_to_hash.pop(b)]

    def reset_prefix_cache(self) -> int:
        """Forget every cached page nobody holds (they become plain free pages); returns how many.
        Pages held by requests keep their hashes (their holders may still publish them)."""
        with self._lock:
            forgotten = len(self._evictable)
            for b in self._evictable:
                del self._hash_to_block[self._block_to_hash.pop(b)]
                self._free.append(b)
            self._evictable.clear()
            return forgotten

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def check_integrity(self) -> None:
        """Assert the allocator's invariants; cheap enough to run after every test step."""
        with self._lock:
            free, evictable = set(self._free), set(self._evictable)
            assert len(free) == len(self._free), "a block is twice on the free list"
            assert not free & evictable, "a block is both free and evictable"
            for b in range(self.num_blocks):
                rc = self._refcount[b]
                assert rc >= 0, f"block {b} has refcount {rc}"
                in_pool = b in free or b in evictable
                assert in_pool == (rc == 0), f"block {b}: refcount {rc} but free={b in free} evictable={b in evictable}"
                if b in evictable:
                    assert b in self._block_to_hash, f"evictable block {b} has no hash"
                if b in free:
                    assert b not in self._block_to_hash, f"free block {b} still carries a hash"
            assert len(self._hash_to_block) == len(self._block_to_hash)
            for b in self._pending:
                assert b in self._block_to_hash, f"pending block {b} carries no hash"
                assert self._refcount[b] > 0, f"pending block {b} (KV never written) is cached unheld"
            for h, b in self._hash_to_block.items():
                assert self._block_to_hash[b] == h, f"hash maps of block {b} disagree"
