"""Prefill-only and decode-only engines: `EngineCore` with one worker each.

Same model, schedulers, runner and workers as the unified / semi-PD engines (so
comparisons are fair); only the handoff differs. `PrefillOnlyEngine` runs the
`PrefillWorker`, whose finished prefills are exported (KV gathered from their pages,
pages freed, payload sent) instead of being added to a local decode scheduler.
`DecodeOnlyEngine` runs the `DecodeWorker` plus an importer thread that allocates pages
in its own pool (queueing payloads while none are free), copies the KV in and hands the
rebuilt request to its decode scheduler. A request the decode side preempts goes back
to the prefill engine (`requeue`) for recomputation, as in the unified engine.

Seeded sampling carries the request's generator state across; aborts that arrive while
a request is in transit are remembered (`abort_or_mark`) and applied on arrival.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch

from actors.config import EngineConfig
from actors.disagg.state import request_from, state_of
from actors.disagg.transport import KVPayload, KVTransferError, KVTransport, RequestState
from actors.engine.core import EngineCore
from actors.engine.durations import Durations
from actors.engine.workers import DecodeWorker, Emit, PrefillWorker, Wakeup, Worker, start_entered_thread
from actors.kv.manager import pages_for
from actors.request import FinishReason, Request, TokenDelta
from actors.runner.transfer import to_device
from actors.slo.ordering import OrderKey

log = logging.getLogger(__name__)
# upper bounds (s) of the handoff histograms: a peer copy of a long prompt's KV takes milliseconds, one through the
# host tens of them; waiting for decode pages can take seconds
HANDOFF_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def whole_device(config: EngineConfig) -> EngineConfig:
    """`config` for a one-worker engine: its worker gets the whole device (no SM split)."""
    return replace(config, mode="unified")


class _MarksAborts(EngineCore):
    """Abort of a request that may not be here yet: remembered and applied when it arrives."""

    _marks: dict[str, FinishReason]

    def abort_or_mark(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """Abort `request_id` if this engine holds it (True); else remember the abort (False)."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.finished:
                self._marks[request_id] = reason
                return False
            req.abort(reason)
        for w in self.workers:
            w.wakeups[w.name].set()
        return True

    def forget_mark(self, request_id: str) -> None:
        with self._lock:
            self._marks.pop(request_id, None)

    def _admit(self, req: Request) -> FinishReason | None:
        """Register an arriving request, unless an abort for it is pending (then return why). A structured output's
        grammar is compiled again here and advanced past the output so far (it is host state that does not travel).
        Raises EngineDeadError once the engine lost its GPU (its workers stopped: nothing would run the request)."""
        if req.params.structured_outputs is not None:
            req.grammar = self.grammars.compile(req.params.structured_outputs)
            req.grammar.accept_all(req.output_token_ids)
        with self._lock:  # `_device_lost` ends the requests registered by then
            self.refuse_if_dead()
            reason = self._marks.pop(req.request_id, None) or req.abort_requested
            if reason is None:
                self._requests[req.request_id] = req
        return reason

    def _emit_end(self, request_id: str, num_prompt_tokens: int, reason: FinishReason, error: str | None = None
                  ) -> None:
        """End a request that no worker holds (dropped in transit, or its KV could not move)."""
        self._emit_and_forget([TokenDelta(request_id, (), reason, error=error, num_prompt_tokens=num_prompt_tokens)])

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)


class PrefillOnlyEngine(_MarksAborts):
    """Runs prefills only; each finished prefill (with its first token) goes to `transport`."""

    def __init__(self, config: EngineConfig, emit: Emit, transport: KVTransport, order: OrderKey | None = None) -> None:
        self.transport = transport
        self._marks = {}
        self._export_stream: torch.cuda.Stream | None = None
        super().__init__(whole_device(config), emit, order)

    def _make_workers(self) -> list[Worker]:
        wakeups = {"prefill": Wakeup(), "decode": Wakeup()}  # "decode" is set on handoffs; nobody waits on it
        runner = self._make_runner(False)
        return [PrefillWorker(self.prefill, self.decode, runner, self.partitioner, self._emit_and_forget, wakeups,
                              handoff=self._export, overlap=self.config.overlap_prefill)]

    def _export(self, req: Request) -> None:
        """On the prefill worker: send `req`'s state and the KV of its computed tokens, free its pages. A request
        whose export fails before it is sent ends with an error (nobody else holds it any more); once sent it is the
        decode side's, whatever fails after."""
        self._forget(req.request_id)  # from here on an abort is the decode side's (or a mark)
        n = pages_for(req.num_computed_tokens, self.pool.page_size)
        sent = False
        try:
            with self._exporting():
                # through the staging ring: no host wait for the prefill iteration already queued
                ids = to_device(req.block_ids[:n], torch.long, self.pool.kv.device)
                kv = self.pool.kv[:, ids]  # [L, n, 2, page_size, Hkv, D], a copy
                self.transport.send(KVPayload(state_of(req), kv))
                sent = True
        except Exception as e:
            log.exception("KV export of %s failed", req.request_id)
            if not sent:
                req.finish_reason = FinishReason.ERROR
                self._emit_end(req.request_id, req.num_prompt_tokens, FinishReason.ERROR, f"KV export failed: {e}")
        finally:
            self.prefill.kv.release(req)

    @contextmanager
    def _exporting(self) -> Iterator[None]:
        """On a GPU, a stream of the export's own for the gather and the send: the prefill stream already holds
        the next iteration, queued before this prompt's first token was read (which means the pages are
        written), and decode should not wait for it. The prefill stream then waits for the gather before any
        later iteration can write the freed pages."""
        runner_stream = self.workers[0].runner.stream
        if runner_stream is None:
            yield
            return
        if self._export_stream is None:
            self._export_stream = torch.cuda.Stream(self.device)
        try:
            with torch.cuda.stream(self._export_stream):
                yield
        finally:
            runner_stream.wait_stream(self._export_stream)

    def readmit(self, state: RequestState) -> None:
        """Take back a request the decode side preempted (no KV): recompute it, then export again. One that cannot be
        taken back (its grammar does not compile again, the engine lost its GPU) ends with an error: the decode side
        has let it go, so nobody else would end it."""
        try:
            req = request_from(state, self.device)
            reason = self._admit(req)
        except Exception as e:
            log.exception("readmitting %s failed", state.request_id)
            self._emit_end(state.request_id, state.num_prompt_tokens, FinishReason.ERROR, f"readmit failed: {e}")
            return
        if reason is not None:
            self._emit_end(state.request_id, state.num_prompt_tokens, reason)
            return
        self.prefill.add(req)
        self.workers[0].wakeups["prefill"].set()


class DecodeOnlyEngine(_MarksAborts):
    """Runs decodes only, of requests imported from `transport` into its own pool.

    How long each handoff took, from the payload's `sent_at` (the prefill side let it go, after its first token):
    `transfer_times` until it was received here with its KV on this device, `handoff_times` until the request
    joined the decode batch (it may wait for free pages, then its KV is copied into them). The request's second
    token comes after its handoff, so the handoff is part of its first inter-token latency, not of its TTFT.
    """

    admits_prefills = False  # imported requests come with their KV; preempted ones go back to the prefill engine

    def __init__(self, config: EngineConfig, emit: Emit, transport: KVTransport,
                 requeue: Callable[[RequestState], None]) -> None:
        self.transport = transport
        self._send_back_to = requeue
        self._marks = {}
        self._backlog: deque[KVPayload] = deque()  # received, waiting for free pages (FIFO)
        self._stop_import = threading.Event()
        self._importer: threading.Thread | None = None
        self.num_imported = 0
        self.transfer_times = Durations(HANDOFF_BUCKETS_S)
        self.handoff_times = Durations(HANDOFF_BUCKETS_S)
        super().__init__(whole_device(config), emit)

    def _make_workers(self) -> list[Worker]:
        wakeups = {"prefill": Wakeup(), "decode": Wakeup()}
        runner = self._make_runner(True)
        return [DecodeWorker(self.prefill, self.decode, runner, self.partitioner, self._emit_and_forget, wakeups,
                             requeue=self._send_back, overlap=self.config.overlap_decode)]

    def start(self) -> None:
        """Start the importer thread, then the decode worker. Raises what the importer's set-up raised (the thread
        has then ended): an engine that cannot import must not count as started, or every request would wait for
        its KV. If the worker cannot start, the importer stops again."""
        if self._importer is None:
            self._stop_import.clear()
            self._importer = start_entered_thread("semipd-kv-import", self._enter_import_thread, self._import_loop,
                                                  "the KV importer")
        try:
            super().start()
        except BaseException:
            self._stop_importer()
            raise

    def shutdown(self) -> None:
        self._stop_importer()
        super().shutdown()

    def _stop_importer(self) -> None:
        self._stop_import.set()
        if self._importer is not None:
            self._importer.join(timeout=30)
            self._importer = None

    @property
    def num_backlogged(self) -> int:
        """Received payloads still waiting for pages."""
        return len(self._backlog)

    def _enter_import_thread(self) -> None:
        """The importer thread's set-up: its current device becomes the decode pool's (a new thread starts on the
        first GPU; the engine's own device may be plain "cuda", which `set_device` refuses)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.pool.kv.device)

    def _import_loop(self) -> None:
        while not self._stop_import.is_set():
            try:
                self.poll_imports(timeout=0.01 if self._backlog else 0.05)
            except Exception:  # keep importing; the failed payload was failed in _drain_backlog
                log.exception("KV import failed")

    def poll_imports(self, timeout: float) -> None:
        """Receive at most one payload (waiting up to `timeout` s), then import what fits.

        The importer thread calls this in a loop; tests call it directly on an unstarted engine.
        """
        try:
            payload = self.transport.receive(timeout)
        except KVTransferError as e:
            self._emit_end(e.state.request_id, e.state.num_prompt_tokens, FinishReason.ERROR,
                           f"KV transfer failed: {e.cause}")
            raise
        if payload is not None:
            self.transfer_times.observe(time.monotonic() - payload.sent_at)
            self._backlog.append(payload)
        self._drain_backlog()

    def _drain_backlog(self) -> None:
        """Import payloads in order while pages are free; drop those aborted meanwhile."""
        while self._backlog:
            payload = self._backlog[0]
            try:
                done = self._try_import(payload)
            except Exception as e:
                self.transport.release(self._backlog.popleft())
                state = payload.state
                self._emit_end(state.request_id, state.num_prompt_tokens, FinishReason.ERROR, f"KV import failed: {e}")
                raise
            if not done:
                self._drop_aborted_in_backlog()
                return
            self.transport.release(self._backlog.popleft())

    def _drop_aborted_in_backlog(self) -> None:
        keep: deque[KVPayload] = deque()
        dropped: list[tuple[KVPayload, FinishReason]] = []
        for p in self._backlog:
            with self._lock:
                reason = self._marks.pop(p.state.request_id, None) or p.state.abort_reason
            if reason is None:
                keep.append(p)
            else:
                dropped.append((p, reason))
        self._backlog = keep  # before releasing: an emit that raises must not leave a released payload queued
        for p, reason in dropped:
            self.transport.release(p)
            self._emit_end(p.state.request_id, p.state.num_prompt_tokens, reason)

    def _try_import(self, payload: KVPayload) -> bool:
        """Import one payload; False (and nothing changed) when its pages are not free yet. Raises EngineDeadError
        once the engine lost its GPU."""
        state = payload.state
        assert payload.kv is not None, "a payload for decode carries KV"
        ps = self.pool.page_size
        assert payload.kv.shape[1] == pages_for(state.num_computed_tokens, ps) and payload.kv.shape[3] == ps
        with self._lock:
            reason = self._marks.pop(state.request_id, None) or state.abort_reason
        if reason is not None:
            self._emit_end(state.request_id, state.num_prompt_tokens, reason)
            return True
        self.refuse_if_dead()  # else a payload waiting for pages would wait for good: nothing frees them
        blocks = self.allocator.allocate(payload.num_pages)
        if blocks is None:
            return False
        try:
            req = self._rebuild(payload, blocks)
            reason = self._admit(req)
        except BaseException:  # nothing holds the pages yet
            self.allocator.free(blocks)
            raise
        if reason is not None:
            self.allocator.free(blocks)
            self._emit_end(state.request_id, state.num_prompt_tokens, reason)
            return True
        self.num_imported += 1
        self.decode.add(req)
        self.handoff_times.observe(time.monotonic() - payload.sent_at)
        self.workers[0].wakeups["decode"].set()
        return True

    def _rebuild(self, payload: KVPayload, blocks: list[int]) -> Request:
        """Copy `payload`'s KV into the pool pages `blocks`; its request, holding them."""
        assert payload.kv is not None
        ids = torch.tensor(blocks, dtype=torch.long, device=self.pool.kv.device)
        self.pool.kv[:, ids] = payload.kv.to(self.pool.kv.device, self.pool.kv.dtype)  # [L, n, 2, ps, Hkv, D]
        if self.device.type == "cuda":  # the pages are written before the decode worker's stream reads them
            torch.cuda.current_stream(self.device).synchronize()
        req = request_from(payload.state, self.device)
        req.block_ids = blocks
        return req

    def _send_back(self, req: Request) -> None:
        """On the decode worker: a preempted request (pages already released) goes back to prefill."""
        self._forget(req.request_id)
        self._send_back_to(state_of(req))
