"""`DisaggPair`: a prefill-only and a decode-only engine behind EngineCore's request API."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

import torch

from actors.config import ConfigError, EngineConfig, ModelArch
from actors.disagg.engines import DecodeOnlyEngine, PrefillOnlyEngine
from actors.disagg.transport import CpuTransport, DeviceTransport, KVTransport
from actors.engine.core import EngineStats
from actors.engine.partitioner import Partitioner
from actors.engine.workers import Emit, discard
from actors.kv.allocator import BlockAllocator
from actors.request import FinishReason, SamplingParams, TokenDelta


def pair_devices(device: torch.device) -> tuple[torch.device, torch.device]:
    """(prefill, decode) devices of a serving pair: the first two GPUs this process sees (Ray gives a
    `disagg` engine actor two), or the CPU twice."""
    if device.type != "cuda":
        return device, device
    if torch.cuda.device_count() < 2:
        raise ConfigError(f"disagg mode needs two GPUs per engine (prefill on one, decode on the other); "
                          f"this process sees {torch.cuda.device_count()}")
    return torch.device("cuda", 0), torch.device("cuda", 1)


IN_FLIGHT_SHARE_OF_DECODE_POOL = 0.25  # KV sent and not yet in the decode pool, at most this share of its size


def on_device(config: EngineConfig) -> AbstractContextManager[object]:
    """The engine's GPU as the current device while it is built (nothing on the CPU)."""
    device = config.resolved_device
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


class DisaggPair:
    """Requests enter the prefill engine, move to the decode engine through `transport`
    with their KV, and (if preempted there) come back. Deltas of both engines go to `emit`
    in order per request: each side emits a request's tokens before handing it on.

    KV waiting for pages on the decode side lives outside its pool, so a `DeviceTransport` without a bound of
    its own gets one: `IN_FLIGHT_SHARE_OF_DECODE_POOL` of the decode pool's bytes (past it, prefill waits).
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
        with on_device(prefill_config):
            self.prefill = PrefillOnlyEngine(prefill_config, self._on_deltas, self.transport)
        with on_device(decode_config):  # its graphs, kernels and cuBLAS handles made on its own GPU
            self.decode = DecodeOnlyEngine(decode_config, self._on_deltas, self.transport,
                                           requeue=self.prefill.readmit)
        if self.prefill.dtype != self.decode.dtype:
            raise ConfigError("the prefill and decode engines must use the same dtype")
        if isinstance(self.transport, DeviceTransport) and self.transport.max_in_flight_bytes is None:
            pool = self.decode.pool.kv
            self.transport.max_in_flight_bytes = max(1, int(IN_FLIGHT_SHARE_OF_DECODE_POOL * pool.numel()
                                                             * pool.element_size()))
        # no SM split to change: each engine has its whole device (what the actor and the controller read)
        total = self.prefill.partitioner.total_sms
        self.partitioner = Partitioner(total, (total,), total)

    @classmethod
    def serving(cls, config: EngineConfig, emit: Emit) -> DisaggPair:
        """The pair of a `disagg` engine: both engines with `config`, on `pair_devices`, KV moved by a
        `DeviceTransport` to the decode device."""
        prefill_device, decode_device = pair_devices(config.resolved_device)
        return cls(replace(config, device=str(prefill_device)), replace(config, device=str(decode_device)), emit,
                   DeviceTransport(decode_device))

    # -- EngineCore's request API (what the front ends call) ----------------------

    def start(self) -> None:
        """Start the decode engine, then the prefill one; if either cannot start, neither runs."""
        self.decode.start()
        try:
            self.prefill.start()
        except BaseException:
            self.decode.shutdown()
            raise

    def shutdown(self) -> None:
        """Shut both engines down; nothing is emitted afterwards (see `EngineCore.shutdown`)."""
        self.transport.close()  # a prefill worker waiting to send would hold up its shutdown
        self.prefill.shutdown()
        self.decode.shutdown()
        self._emit = discard

    def validate(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Both pools must hold the request (the decode one holds all of it at the end)."""
        self.prefill.validate(num_prompt_tokens, params)
        self.decode.validate(num_prompt_tokens, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, deadline: float | None = None) -> None:
        """`EngineCore.add_request`; EngineDeadError once either engine lost its GPU (prefill refuses for its own)."""
        self.decode.refuse_if_dead()
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

    # -- what an engine actor reads of its core (`actors.gpu_actor.EngineActor`) ------------

    @property
    def arch(self) -> ModelArch:
        return self.prefill.arch

    @property
    def max_model_len(self) -> int:
        return min(self.prefill.max_model_len, self.decode.max_model_len)

    @property
    def allocator(self) -> BlockAllocator:
        """The prefill pool's allocator (the prompts' prefix cache is there)."""
        return self.prefill.allocator

    @property
    def decode_stalled_seconds(self) -> float:
        return self.decode.decode_stalled_seconds

    @property
    def device_error(self) -> BaseException | None:
        return self.prefill.device_error or self.decode.device_error

    @property
    def on_device_lost(self) -> Callable[[BaseException], None]:
        return self.prefill.on_device_lost

    @on_device_lost.setter
    def on_device_lost(self, hook: Callable[[BaseException], None]) -> None:
        self.prefill.on_device_lost = self.decode.on_device_lost = hook

    def stats(self) -> EngineStats:
        """One engine's stats: prefill's queue and prefill worker, decode's batch and decode worker (payloads
        waiting for decode pages count as waiting), KV usage of the fuller pool, pages of both."""
        p, d = self.prefill.stats(), self.decode.stats()
        return replace(
            p, num_waiting=p.num_waiting + self.decode.num_backlogged, num_decoding=d.num_decoding,
            decode_context_tokens=d.decode_context_tokens, kv_usage=max(p.kv_usage, d.kv_usage),
            num_pages=p.num_pages + d.num_pages, prefill_sms=self.partitioner.current,
            total_sms=self.partitioner.total_sms, num_switches=0, switches=(),
            seconds_since_progress=max(p.seconds_since_progress, d.seconds_since_progress),
            iterations={**p.iterations, **d.iterations}, busy_seconds={**p.busy_seconds, **d.busy_seconds},
            iteration_counts={**p.iteration_counts, **d.iteration_counts}, tokens={**p.tokens, **d.tokens},
            launch_seconds={**p.launch_seconds, **d.launch_seconds}, launch_parts={**p.launch_parts, **d.launch_parts},
            recent_decode_step_ms=d.recent_decode_step_ms, decode_pace_ms=d.decode_pace_ms,
            paced_seconds=d.paced_seconds, cuda_mallocs=p.cuda_mallocs + d.cuda_mallocs,
            cuda_alloc_retries=p.cuda_alloc_retries + d.cuda_alloc_retries,
            cuda_frees=p.cuda_frees + d.cuda_frees,
            cuda_host_allocs=max(p.cuda_host_allocs, d.cuda_host_allocs),  # one process, one pinned allocator
            num_preemptions=p.num_preemptions + d.num_preemptions,
        )

    def transfer_stats(self) -> dict[str, Any]:
        """What moving requests between the engines cost: KV bytes sent, and the handoff times
        (`DecodeOnlyEngine`: {"counts" per bucket of HANDOFF_BUCKETS_S, "sum"} each)."""
        return dict(kv_transfer_bytes=self.transport.bytes_moved,
                    kv_transfer_seconds=self.decode.transfer_times.to_dict(),
                    kv_handoff_seconds=self.decode.handoff_times.to_dict())

    def _on_deltas(self, deltas: list[TokenDelta]) -> None:
        done = [d.request_id for d in deltas if d.finished]
        if done:
            with self._lock:
                for rid in done:
                    self._live.discard(rid)
                    self.prefill.forget_mark(rid)
                    self.decode.forget_mark(rid)
        self._emit(deltas)
