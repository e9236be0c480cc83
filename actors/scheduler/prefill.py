"""Prefill scheduler: admits waiting requests and plans chunks within a token budget."""

from __future__ import annotations

import threading

from actors.kv.manager import KVManager, pages_for
from actors.request import Request
from actors.scheduler.plan import SeqChunk, chunk_of, prompt_scoring
from actors.slo.ordering import FCFSOrder, OrderKey


class PrefillScheduler:
    """Owns requests from arrival until their prompt (and any recomputed output) is in KV.

    `running` holds admitted requests with pages and a partial prefill; they go first,
    so a chunked prompt finishes before new ones start. `waiting` is admitted in
    `order` (`actors.slo.ordering`: FCFS by default, or earliest deadline first; both end
    admission's hold-back of a request once it has waited their aging bound).
    `prompt_tokens_admitted` / `cached_tokens_admitted`: prompt tokens of the requests
    admitted for the first time, and how many of them the prefix cache served.
    """

    def __init__(
        self,
        kv: KVManager,
        max_tokens: int,
        decode_reserve_pages: int = 0,
        order: OrderKey | None = None,
    ) -> None:
        self.kv = kv
        self.max_tokens = max_tokens
        self.decode_reserve_pages = decode_reserve_pages
        self.order = FCFSOrder() if order is None else order
        self._lock = threading.Lock()
        self._waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prompt_tokens_admitted = 0
        self.cached_tokens_admitted = 0

    def add(self, req: Request) -> None:
        """Queue a new or preempted request (thread-safe)."""
        with self._lock:
            self._waiting.append(req)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def waiting_tokens(self) -> int:
        """Prompt tokens not yet computed, over waiting and running requests."""
        with self._lock:
            reqs = self._waiting + self.running
        return sum(r.num_uncomputed for r in reqs)

    def queued_ahead_of(self, req: Request) -> tuple[int, int]:
        """Uncomputed tokens, and number, of the requests a new `req` would wait for: every partial prefill, and
        each waiting request of its priority or a more urgent one, or one that `order` puts first (an aged one).
        A waiting request of a lower priority class (a larger value) that `order` puts after it does not count."""
        key = self.order(req)
        with self._lock:
            waiting = list(self._waiting)
        ahead = [r for r in waiting if r.priority <= req.priority or not key < self.order(r)] + list(self.running)
        return sum(r.num_uncomputed for r in ahead), len(ahead)

    def has_work(self) -> bool:
        return bool(self._waiting or self.running)

    def may_release_pages(self) -> bool:
        """Whether `take_aborted` or `schedule` may now give back pages of a running prefill: one was
        aborted, or free pages are short of one iteration's budget (scheduling may preempt)."""
        return (any(r.abort_requested for r in self.running)
                or self.kv.num_free_pages * self.kv.page_size < self.max_tokens)

    def take_aborted(self, running: bool = True) -> list[Request]:
        """Remove requests whose abort was asked; pages of running ones are released. Not `running`: only waiting
        ones (no pages), while a queued iteration may still write the running ones' pages.

        Each request's flag is read once: another thread may abort it at any moment, and a request taken out of
        `waiting` but not returned would never be finished."""
        gone: list[Request] = []
        with self._lock:
            keep: list[Request] = []
            for r in self._waiting:
                (gone if r.abort_requested else keep).append(r)
            self._waiting = keep
        for r in [r for r in self.running if r.abort_requested and running]:
            self.running.remove(r)
            self.kv.release(r)
            gone.append(r)
        return gone

    def schedule(self, budget: int | None = None, preempt: bool = True) -> tuple[list[SeqChunk], list[Request]]:
        """Plan this iteration's prefill chunks; `budget` tokens at most (default: max_tokens). Not `preempt`:
        no partial prefill gives its pages back (a queued iteration may still write them).

        A request admitted into the iteration may hit the pages that chunks planned before it compute (see `_plan`).
        The caller queues the iteration and calls `finish_chunk` for every chunk, or, if it cannot be queued, `drop`s
        every one of its requests (those hits would read pages that are never written)."""
        budget = self.max_tokens if budget is None else budget
        if budget <= 0:
            return [], []
        chunks, reqs, budget = self._continue_running(budget)
        while preempt and not chunks and len(self.running) > 1:
            self._preempt_last_running()
            chunks, reqs, budget = self._continue_running(budget)
        while budget > 0:
            req = self._admit_next()
            if req is None:
                break
            n = self.kv.grow(req, min(budget, req.num_uncomputed))
            if n == 0:  # the decode worker took the page admission counted on; retry next iteration
                break
            chunks.append(self._plan(req, n))
            reqs.append(req)
            budget -= n
        return chunks, reqs

    def _continue_running(self, budget: int) -> tuple[list[SeqChunk], list[Request], int]:
        """Next chunks of the partial prefills, oldest first, within `budget`; and the budget left."""
        chunks: list[SeqChunk] = []
        reqs: list[Request] = []
        for req in list(self.running):
            if budget <= 0:
                break
            n = self.kv.grow(req, min(budget, req.num_uncomputed))
            if n == 0:
                continue
            chunks.append(self._plan(req, n))
            reqs.append(req)
            budget -= n
        return chunks, reqs, budget

    def _plan(self, req: Request, n: int) -> SeqChunk:
        """The request's next `n` tokens as this iteration's chunk; its full pages among them are published ahead
        (`KVManager.publish_ahead`), so that a request admitted after it into this iteration hits them."""
        chunk = _chunk(req, n)
        self.kv.publish_ahead(req, chunk.context_len)
        return chunk

    def _admit_next(self) -> Request | None:
        """Move the first waiting request (in `order`) to running if a page is free for it.

        Its first fresh page must leave `decode_reserve_pages` free. Its prefix-cache hits do not count: they are
        pages it would otherwise recompute into fresh ones, so counting them would refuse a request because its
        prefix is cached (for good on an engine where nothing else frees pages).
        """
        with self._lock:
            if not self._waiting:
                return None
            self._waiting.sort(key=self.order)
            req = self._waiting[0]
            if req.abort_requested or self.kv.num_free_pages - 1 < self.decode_reserve_pages:
                return None
            self.kv.match_prefix(req)
            assert pages_for(req.num_computed_tokens + 1, self.kv.page_size) == len(req.block_ids) + 1, \
                "prefix hits leave the first uncomputed token's page to allocate"
            self._waiting.pop(0)
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed_tokens
            self.prompt_tokens_admitted += req.num_prompt_tokens
            self.cached_tokens_admitted += req.num_cached_tokens
        self.running.append(req)
        return req

    def _preempt_last_running(self) -> None:
        """Break a standoff between partial prefills that all wait for pages: the one last in `order` (of the
        lowest priority, the youngest, the latest deadline) gives its pages back, and those before it go on."""
        victim = max(self.running, key=self.order)
        self.running.remove(victim)
        self.kv.release(victim)
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.add(victim)

    def drop(self, req: Request) -> None:
        """Release a request this scheduler owns (finished or failed)."""
        if req in self.running:
            self.running.remove(req)
        self.kv.release(req)

    def finish_chunk(self, req: Request, num_tokens: int) -> None:
        """Account for a computed chunk (queued at least); a request whose tokens are all computed leaves `running`.

        A chunk that stops one token short of the end sampled nothing: the request stays,
        and its last token is computed (and sampled from) in a later chunk.
        """
        self.kv.commit(req, num_tokens)
        if req.num_uncomputed == 0 and req in self.running:
            self.running.remove(req)


def _chunk(req: Request, n: int) -> SeqChunk:
    """The request's next `n` uncomputed tokens as a chunk, scoring its prompt where asked."""
    start = req.num_computed_tokens
    scoring = None
    if req.scores_prompt:
        scoring = prompt_scoring(req.token_ids, req.num_prompt_tokens, len(req.prompt_logprobs), start, n,
                                 req.params.prompt_logprobs or 0)
    return chunk_of(req.request_id, req.token_ids, start, n, req.block_ids, scoring)
