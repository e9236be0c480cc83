"""`DisaggPair`: a prefill-only and a decode-only engine behind EngineCore's request API."""

from __future__ import annotations

import threading

from actors.config import ConfigError, EngineConfig
from actors.disagg.engines import DecodeOnlyEngine, PrefillOnlyEngine
from actors.disagg.transport import CpuTransport, KVTransport
from actors.engine.workers import Emit, discard
from actors.request import FinishReason, SamplingParams, TokenDelta


class DisaggPair:
    """Requests enter the prefill engine, move to the decode engine through `transport`
    with their KV, and (if preempted there) come back. Deltas of both engines go to `emit`
    in order per request: each side emits a request's tokens before handing it on.
    """

    def __init__(self, prefill_config: EngineConfig, decode_config: EngineConfig, emit: Emit,
                 transport: KVTransport | None = None) -> None:
        if prefill_config.model != decode_config.model:
            raise ConfigError("the prefill and decode engines must serve the same model")
        if prefill_config.cache.page_size != decode_config.cache.page_size:
            raise ConfigError("the prefill and decode engines must use the same page_size")
        self.transport: KVTransport = transport or CpuTransport()
        self._emit = emit
        self._lock = threading.Lock()
        self._live: set[str] = set()
        self.prefill = PrefillOnlyEngine(prefill_config, self._on_deltas, self.transport)
        self.decode = DecodeOnlyEngine(decode_config, self._on_deltas, self.transport, requeue=self.prefill.readmit)
        if self.prefill.dtype != self.decode.dtype:
            raise ConfigError("the prefill and decode engines must use the same dtype")

    # -- EngineCore's request API (what the front ends call) ----------------------

    def start(self) -> None:
        self.decode.start()
        self.prefill.start()

    def shutdown(self) -> None:
        """Shut both engines down; nothing is emitted afterwards (see `EngineCore.shutdown`)."""
        self.prefill.shutdown()
        self.decode.shutdown()
        self._emit = discard

    def validate(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Both pools must hold the request (the decode one holds all of it at the end)."""
        self.prefill.validate(num_prompt_tokens, params)
        self.decode.validate(num_prompt_tokens, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, deadline: float | None = None) -> None:
        self.decode.validate(len(prompt_token_ids), params)
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._live.add(request_id)
        try:
            self.prefill.add_request(request_id, prompt_token_ids, params, priority, deadline)
        except Exception:
            with self._lock:
                self._live.discard(request_id)
            raise

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """Abort wherever the request is: on either engine, or in transit (applied on arrival)."""
        with self._lock:
            if request_id not in self._live:
                return False
            self.prefill.abort_or_mark(request_id, reason)
            self.decode.abort_or_mark(request_id, reason)
        return True

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._live)

    def _on_deltas(self, deltas: list[TokenDelta]) -> None:
        done = [d.request_id for d in deltas if d.finished]
        if done:
            with self._lock:
                for rid in done:
                    self._live.discard(rid)
                    self.prefill.forget_mark(rid)
                    self.decode.forget_mark(rid)
        self._emit(deltas)
