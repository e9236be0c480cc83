"""The interface the front ends (OpenAI HTTP, gRPC, CLI) use to reach engines.

`Router` (cluster.router) implements it over the GPU actors of a Ray cluster;
`LocalEngineClient` implements it over one in-process `AsyncLLM` (no Ray), for
`semipd serve --local`, and for front-end tests that need a real engine but no cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from actors.config import EngineConfig
from actors.engine.frontend import AsyncLLM, StreamChunk
from actors.request import SamplingParams


T = TypeVar("T")
HEALTH_STALL_SECONDS = 30.0  # an engine with work that made no progress for this long is not serving
LOADS_TIMEOUT_SECONDS = 5.0  # the front ends' wait for the engines' loads
INLINE_TOKENIZE_CHARS = 16384  # the front ends tokenize longer texts in a worker thread


class NoCapacityError(RuntimeError):
    """No engine can take the request now (all draining, dead, or admission refused)."""


async def off_the_loop_if_long(chars: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` (a tokenization of `chars` characters) here, or in a worker thread when the text is long: a
    front end's event loop also carries every stream in flight."""
    if chars < INLINE_TOKENIZE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


@dataclass(frozen=True)
class GenerateRequest:
    """One request as the front ends hand it over: token ids already made from text/chat."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    session_id: str | None = None

    def deadline(self) -> float | None:
        """The request's own TTFT target as a first-token deadline from now (`time.monotonic()` seconds), for
        deadline-aware prefill order and admission; None without one (the deployment's target applies)."""
        return time.monotonic() + self.ttft_slo_ms / 1000 if self.ttft_slo_ms else None


@dataclass(frozen=True)
class ModelInfo:
    name: str  # served model name (the `model` field of OpenAI requests)
    model_dir: str
    architecture: str
    max_model_len: int
    vocab_size: int
    mode: str


@dataclass(frozen=True)
class EngineLoad:
    """One engine's load as the router, the controller and the front ends' health checks see it."""

    engine_id: str
    node_id: str = ""
    healthy: bool = True
    draining: bool = False
    in_flight: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # EngineStats fields

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def serving_problem(self, stall_s: float = HEALTH_STALL_SECONDS) -> str | None:
        """Why this engine is not serving (unhealthy, draining, no progress for more than `stall_s` seconds),
        None if it is: the rule of HTTP's `/health` and of gRPC's health service."""
        stalled = float(self.stats.get("seconds_since_progress", 0.0))
        if not self.healthy:
            return "unhealthy"
        if self.draining:
            return "draining"
        if stalled > stall_s:
            return f"no progress for {stalled:.0f}s"
        return None


class EngineClient(Protocol):
    def model_info(self) -> ModelInfo: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """Stream chunks; the last has `finish_reason`. Closing the iterator early aborts."""
        ...

    async def abort(self, request_id: str) -> bool: ...

    async def loads(self) -> list[EngineLoad]: ...

    async def reset_prefix_cache(self) -> dict[str, int]:
        """Each engine that answered: the cached pages it forgot (none held by a request)."""
        ...


class LocalEngineClient:
    """An `EngineClient` over one in-process engine."""

    def __init__(self, config: EngineConfig, served_name: str | None = None) -> None:
        self.llm = AsyncLLM(config)
        self.llm.start()
        core = self.llm.core
        self._info = ModelInfo(
            name=served_name or config.model.rstrip("/").split("/")[-1],
            model_dir=config.model,
            architecture=core.arch.architecture,
            max_model_len=core.max_model_len,
            vocab_size=core.arch.vocab_size,
            mode=config.mode,
        )
        self.draining = False

    def model_info(self) -> ModelInfo:
        return self._info

    async def generate(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        if self.draining:
            raise NoCapacityError("the server is draining")
        if self.llm.core.device_error is not None:
            raise NoCapacityError(f"the engine's GPU failed ({self.llm.core.device_error})")
        async for chunk in self.llm.generate(
            request.prompt_token_ids, request.params, request_id=request.request_id, priority=request.priority,
            deadline=request.deadline(),
        ):
            yield chunk

    async def abort(self, request_id: str) -> bool:
        return self.llm.abort(request_id)

    async def loads(self) -> list[EngineLoad]:
        stats = self.llm.core.stats()
        healthy = stats.seconds_since_progress < 30 and self.llm.core.device_error is None
        return [EngineLoad("local", healthy=healthy, draining=self.draining,
                           in_flight=self.llm.core.num_unfinished, stats=asdict(stats))]

    async def reset_prefix_cache(self) -> dict[str, int]:
        return {"local": self.llm.core.allocator.reset_prefix_cache()}

    def shutdown(self) -> None:
        self.llm.shutdown()
