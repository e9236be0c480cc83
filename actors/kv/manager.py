"""Page bookkeeping of requests on top of the block allocator.

The schedulers call these to give a request pages (prefix hits first), to publish its
full pages to the prefix cache (a prefill's as its iteration is planned, so that requests
admitted into the same iteration share them), and to take everything back.
"""

from __future__ import annotations

from actors.kv.allocator import BlockAllocator, page_hashes
from actors.request import PENDING_TOKEN, Request


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class KVManager:
    """Maps requests to pages of one pool; safe to call from both workers at once."""

    def __init__(self, allocator: BlockAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    def match_prefix(self, req: Request) -> None:
        """On admission: reuse cached pages of the request's prefix, advancing its counter.

        At least one token is always left to compute, so the last prompt position
        produces logits. A request still scoring its prompt computes it whole.
        """
        assert not req.block_ids and req.num_computed_tokens == 0
        if not self.allocator.enable_prefix_caching or req.scores_prompt:
            return
        req.page_hashes = page_hashes(req.token_ids, self.page_size, req.page_hashes, req.params.cache_salt)
        max_pages = (req.num_tokens - 1) // self.page_size
        hit = self.allocator.match_prefix(req.page_hashes[:max_pages])
        req.block_ids = hit
        req.num_computed_tokens = len(hit) * self.page_size
        req.num_published_pages = len(hit)

    def grow(self, req: Request, num_tokens: int) -> int:
        """Give `req` pages for up to `num_tokens` more uncomputed tokens.

        Returns how many of them now fit (possibly fewer, or 0 when no page is free).
        """
        have = len(req.block_ids) * self.page_size - req.num_computed_tokens
        if num_tokens <= have:
            return num_tokens
        want = pages_for(num_tokens - have, self.page_size)
        take = min(want, self.allocator.num_free)
        new = self.allocator.allocate(take) if take else None
        if new is None:
            return min(have, num_tokens)
        req.block_ids.extend(new)
        return min(have + take * self.page_size, num_tokens)

    def publish(self, req: Request, num_tokens: int | None = None) -> None:
        """Offer the full pages among the request's first `num_tokens` computed tokens (default: all) to the
        prefix cache.

        A published page may be matched at once, and read by the other worker's stream: only pages whose KV is
        written, or will be before any iteration that can match them runs, may be offered. A prefill iteration
        publishes while it is planned (`publish_ahead`); an overlapped decode step once it finished, up to the
        tokens it wrote, not up to `num_computed_tokens`, which counts the step queued after it.
        """
        if num_tokens is None:
            num_tokens = req.num_computed_tokens
        assert 0 <= num_tokens <= req.num_computed_tokens, f"publish {num_tokens} of {req.num_computed_tokens} tokens"
        self._offer(req, num_tokens // self.page_size, pending=False)

    def publish_ahead(self, req: Request, num_tokens: int) -> None:
        """While a prefill iteration that computes the request's tokens up to `num_tokens` is planned: offer the full
        pages among them to the prefix cache, so that a request admitted later into the same iteration hits them.

        Sound because that request's chunk runs in the same forward pass, which in every layer writes the K/V of
        the whole batch into the pool before attention reads any of it. The pages are pending until `commit` (the
        iteration was queued); `release` before that withdraws them, and every request of the iteration, those that
        hit them included, must then be released too (the workers end them with an error).
        """
        assert num_tokens >= req.num_computed_tokens, f"publish ahead {num_tokens} of {req.num_computed_tokens} tokens"
        self._offer(req, num_tokens // self.page_size, pending=True)

    def commit(self, req: Request, num_tokens: int) -> None:
        """Count `num_tokens` more tokens of the request as computed: the iteration that computes them is queued.
        Pages published ahead for them are settled; its full pages are published."""
        first = req.num_computed_tokens // self.page_size
        req.num_computed_tokens += num_tokens
        settled = req.block_ids[first : min(req.num_published_pages, req.num_computed_tokens // self.page_size)]
        if settled:
            self.allocator.settle(settled)
        self.publish(req)

    def _offer(self, req: Request, full: int, pending: bool) -> None:
        """Publish the request's pages from `num_published_pages` up to `full`."""
        if not self.allocator.enable_prefix_caching or full <= req.num_published_pages:
            return
        assert PENDING_TOKEN not in req.token_ids[req.num_published_pages * self.page_size : full * self.page_size], \
            "publish of a page whose tokens are not all known"
        req.page_hashes = page_hashes(req.token_ids[: full * self.page_size], self.page_size, req.page_hashes[:full],
                                      req.params.cache_salt)
        for i in range(req.num_published_pages, full):
            self.allocator.cache(req.block_ids[i], req.page_hashes[i], pending)
        req.num_published_pages = full

    def release(self, req: Request) -> None:
        """Take back all of the request's pages and reset its counter (finish or preempt). Pages it published ahead
        for an iteration that was never queued (`publish_ahead`) leave the prefix cache."""
        ahead = req.block_ids[req.num_computed_tokens // self.page_size : req.num_published_pages]
        if ahead:
            self.allocator.withdraw(ahead)
        self.allocator.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_published_pages = 0
