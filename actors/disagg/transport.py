"""KV transport between a prefill-only and a decode-only engine.

A `KVPayload` is one request's state plus the KV of its computed tokens, whole pages:
`kv` is [L, n_pages, 2, page_size, Hkv, D] (the pool's layout with the page axis second).
`DeviceTransport` is an in-process queue that copies the KV to the decode engine's device (a peer
copy on a stream of its own when both engines are GPUs of one process, as in the `disagg` serving
mode; a plain copy to the CPU, `CpuTransport`).
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from actors.request import FinishReason, SamplingParams


@dataclass(frozen=True)
class RequestState:
    """What the receiving engine needs to rebuild a `Request` (no pages, no locks)."""

    request_id: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    arrival_time: float
    priority: int
    requested_priority: int
    deadline: float | None
    num_computed_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    first_token_time: float | None
    generator_state: torch.Tensor | None  # torch.Generator.get_state() (a CPU byte tensor) for seeded sampling
    abort_reason: FinishReason | None


@dataclass(frozen=True)
class KVPayload:
    """One request moving prefill -> decode; `kv` is None for a request sent back for recomputation."""

    state: RequestState
    kv: torch.Tensor | None  # [L, n_pages, 2, page_size, Hkv, D]
    sent_at: float = field(default_factory=time.monotonic)  # made: its first token is out, its KV gathered

    @property
    def num_pages(self) -> int:
        return 0 if self.kv is None else int(self.kv.shape[1])

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


class KVTransferError(RuntimeError):
    """A payload's KV did not arrive (its copy failed on the device). The transport has given its room back; the
    receiver ends `state`'s request (nobody else holds it)."""

    def __init__(self, state: RequestState, cause: BaseException) -> None:
        super().__init__(f"the KV of {state.request_id} did not arrive: {cause}")
        self.state = state
        self.cause = cause

    def __reduce__(self) -> tuple[type[KVTransferError], tuple[RequestState, BaseException]]:
        return type(self), (self.state, self.cause)


class KVTransport(ABC):
    """A one-way channel of `KVPayload`s from the prefill engine to the decode engine."""

    @abstractmethod
    def send(self, payload: KVPayload) -> None:
        """Hand off `payload`; the caller may free the source pages as soon as this returns."""

    @abstractmethod
    def receive(self, timeout: float) -> KVPayload | None:
        """The next payload, or None if none arrived within `timeout` seconds. Raises KVTransferError for one
        whose KV did not arrive."""

    @property
    @abstractmethod
    def bytes_moved(self) -> int:
        """KV bytes sent so far."""

    def release(self, payload: KVPayload) -> None:
        """The receiver is done with `payload`'s KV (imported into its pool, or dropped)."""

    def close(self) -> None:
        """Let every `send` through from now on (shutdown: nobody will release)."""


class DeviceTransport(KVTransport):
    """In-process queue; `send` copies the KV to the decode engine's `device`.

    On a GPU the copy runs on a stream of its own (on the source GPU: a copy between two GPUs runs
    on the source's current stream), after the work queued so far on the sender's current stream
    (the gather of the pages), so the sender is not held up; the source stays referenced until
    the copy is done, and `receive` waits for it (on the receiving thread) before it returns the
    payload. To the CPU the copy is a plain one.

    `max_in_flight_bytes` bounds the KV sent and not yet released by the receiver (KV waiting for free
    pages on the decode side lives outside its pool): a `send` past it waits, so the prefill engine stalls
    when decode cannot take its KV, as DistServe's does. A payload always goes when nothing is in flight.
    None: no bound.
    """

    def __init__(self, device: torch.device, max_in_flight_bytes: int | None = None) -> None:
        if max_in_flight_bytes is not None and max_in_flight_bytes < 1:
            raise ValueError(f"max_in_flight_bytes must be >= 1, got {max_in_flight_bytes}")
        self.device = torch.device(device)
        self.max_in_flight_bytes = max_in_flight_bytes
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # the copy stream on each source GPU
        self._landing: dict[torch.device, torch.cuda.Stream] = {}  # the destination's, for copies from another GPU
        self._queue: queue.Queue[tuple[KVPayload, torch.cuda.Event | None, torch.Tensor | None]] = queue.Queue()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._bytes = 0
        self._in_flight = 0
        self._closed = False
        self.num_sent = 0
        self.num_waits = 0  # sends that waited for room

    def send(self, payload: KVPayload) -> None:
        self._take_room(payload.nbytes)
        try:
            kv, done = (None, None) if payload.kv is None else self._copy(payload.kv)
        except BaseException:
            self._give_back_room(payload.nbytes)  # never queued: nobody will release it
            raise
        with self._lock:
            self._bytes += payload.nbytes
            self.num_sent += 1
        self._queue.put((replace(payload, kv=kv), done, payload.kv if done is not None else None))

    def _copy(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """`kv` on this device, and the event that marks the copy done (None: done already)."""
        if self.device.type != "cuda":
            return kv.to(self.device, copy=True), None
        side = kv.device if kv.is_cuda else self.device
        stream = self._stream(self._streams, side)
        if kv.is_cuda:
            stream.wait_stream(torch.cuda.current_stream(side))  # the gather queued before this send
        # Between two GPUs torch's copy also syncs with this thread's current stream on the destination, both ways
        # (that stream waits for the copy). Unset, it is the legacy default stream, which the decode engine's
        # threads share (the importer, the logprob gathers): they would wait for every copy queued so far, each
        # queued behind the prefill work before its send. A landing stream of the transport's own takes the barrier.
        peer = kv.is_cuda and self.device.index is not None and side != self.device
        landing = torch.cuda.stream(self._stream(self._landing, self.device)) if peer else nullcontext()
        with landing, torch.cuda.stream(stream):
            out = kv.to(self.device, copy=True, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return out, done

    @staticmethod
    def _stream(streams: dict[torch.device, torch.cuda.Stream], device: torch.device) -> torch.cuda.Stream:
        stream = streams.get(device)
        if stream is None:
            stream = streams[device] = torch.cuda.Stream(device)
        return stream

    def receive(self, timeout: float) -> KVPayload | None:
        try:
            payload, done, _source = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if done is not None:
            try:
                done.synchronize()  # the copy is complete: any stream may read it, and the source may go
            except Exception as e:
                self._give_back_room(payload.nbytes)  # the receiver never gets it, so never releases it
                raise KVTransferError(payload.state, e) from e
        return payload

    def _take_room(self, nbytes: int) -> None:
        with self._room:
            if not self._fits(nbytes):
                self.num_waits += 1
                self._room.wait_for(lambda: self._fits(nbytes))
            self._in_flight += nbytes

    def _fits(self, nbytes: int) -> bool:
        limit = self.max_in_flight_bytes
        return self._closed or limit is None or self._in_flight == 0 or self._in_flight + nbytes <= limit

    def release(self, payload: KVPayload) -> None:
        self._give_back_room(payload.nbytes)

    def _give_back_room(self, nbytes: int) -> None:
        with self._room:
            if nbytes > self._in_flight:
                raise RuntimeError(f"released {nbytes} bytes of KV with {self._in_flight} in flight "
                                   f"(a payload released twice?)")
            self._in_flight -= nbytes
            self._room.notify_all()

    def close(self) -> None:
        with self._room:
            self._closed = True
            self._room.notify_all()

    @property
    def in_flight_bytes(self) -> int:
        """KV sent and not yet released."""
        with self._lock:
            return self._in_flight

    @property
    def bytes_moved(self) -> int:
        with self._lock:
            return self._bytes

    def __repr__(self) -> str:
        return f"DeviceTransport({self.device}, sent={self.num_sent}, bytes={self.bytes_moved})"


class CpuTransport(DeviceTransport):
    """`DeviceTransport` to CPU memory: the KV is staged there (so the source pages can go)."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
