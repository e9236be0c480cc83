"""Decode scheduler: continuous batching of one token per running request."""

from __future__ import annotations

import threading
from collections import deque

from actors.kv.manager import KVManager
from actors.request import Request
from actors.scheduler.plan import SeqChunk, chunk_of


class DecodeScheduler:
    """Owns requests from their first token to their last.

    Prefill hands requests over through `add` (thread-safe; the page table moves with
    the request, no KV is copied). When a step needs a page and none is free, the
    running request of the lowest priority (the largest value), the youngest among those,
    is preempted, as vLLM's priority scheduling does: its pages are released and it is
    returned to the caller, who gives it back to prefill for recomputation.
    """

    def __init__(self, kv: KVManager, max_seqs: int) -> None:
        self.kv = kv
        self.max_seqs = max_seqs
        self._inbox: deque[Request] = deque()
        self._inbox_lock = threading.Lock()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        """Take over a request whose prompt is in KV. Its first token is out: admission no longer holds it back
        (`Request.requested_priority`), so a preemption does not send it behind every request that is on time."""
        assert not req.in_prefill and req.num_uncomputed == 1
        req.priority = req.requested_priority
        with self._inbox_lock:
            self._inbox.append(req)

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self._inbox)

    def has_work(self) -> bool:
        return bool(self.running or self._inbox)

    def context_tokens(self) -> int:
        """Tokens of every decode-owned request, admitted or still in the inbox (as `num_running` counts them)."""
        with self._inbox_lock:
            reqs = [*self.running, *self._inbox]
        return sum(r.num_tokens for r in reqs)

    def take_aborted(self) -> list[Request]:
        self._admit_inbox()
        gone = [r for r in self.running if r.abort_requested]
        for r in gone:
            self.running.remove(r)
            self.kv.release(r)
        return gone

    def _admit_inbox(self) -> None:
        with self._inbox_lock:
            while self._inbox and len(self.running) < self.max_seqs:
                self.running.append(self._inbox.popleft())

    def schedule(self) -> tuple[list[SeqChunk], list[Request], list[Request]]:
        """Plan one decode step. Returns (chunks, their requests, preempted requests)."""
        self._admit_inbox()
        preempted: list[Request] = []
        scheduled: list[Request] = []
        queue = list(self.running)
        while queue:
            req = queue.pop(0)
            while self.kv.grow(req, 1) == 0:
                victim = max([req, *queue, *scheduled], key=preemption_order)
                self._preempt(victim)  # a scheduled victim's new page goes back too: nothing was launched yet
                preempted.append(victim)
                if victim is req:
                    break
                (queue if victim in queue else scheduled).remove(victim)
            else:
                scheduled.append(req)
        chunks = [chunk_of(r.request_id, r.token_ids, r.num_computed_tokens, 1, r.block_ids) for r in scheduled]
        return chunks, scheduled, preempted

    def schedule_ahead(self, skip: set[Request]) -> tuple[list[SeqChunk], list[Request]] | None:
        """Plan the step after one that is still running (overlapped decode), leaving out `skip`.

        Never preempts (the running step may still write the victim's pages): None when a
        page is missing; the caller then waits for the running step and calls `schedule`.
        Requests of the running step hold `PENDING_TOKEN` as their last token.
        """
        self._admit_inbox()
        scheduled = [r for r in self.running if r not in skip]
        if any(self.kv.grow(r, 1) == 0 for r in scheduled):
            return None
        chunks = [chunk_of(r.request_id, r.token_ids, r.num_computed_tokens, 1, r.block_ids) for r in scheduled]
        return chunks, scheduled

    def advance(self, req: Request) -> None:
        """Count a launched step's token as computed; its page is published once its token is known."""
        req.num_computed_tokens += 1

    def retire(self, req: Request) -> None:
        """Stop scheduling a finished request whose pages a running step may still write (free them later)."""
        self.running.remove(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.release(req)
        req.num_preemptions += 1
        self.num_preemptions += 1

    def finish_step(self, req: Request) -> None:
        req.num_computed_tokens += 1
        self.kv.publish(req)

    def remove(self, req: Request) -> None:
        """Drop a finished request and release its pages."""
        self.running.remove(req)
        self.kv.release(req)


def preemption_order(req: Request) -> tuple[int, float]:
    """The request preempted first has the largest key: the lowest priority, then the latest arrival."""
    return req.priority, req.arrival_time
