"""Profiler: time prefill and decode iterations under each SM split, fit a `LatencyModel`.

It drives the engine's own model runners with synthetic `BatchPlan`s whose pages come
from the engine's allocator (taken for the measurement, given back after), so it sees
the real kernels, attention backend and sampler. For each profiled split it switches
the partitioner and runs each runner on its phase's stream (`partitioner.partition_for`).
Without SM partitions (CPU: the streams are None) the split changes nothing, so the
same code measures the current split only and the fit comes out flat in SMs.
Contention is measured by timing one phase while a background thread loops the other
phase on its own partition. Each point keeps its best of `repeats` timings.

Profile an engine before its workers start (`Profiler.for_engine(core).run()`).
"""

from __future__ import annotations

import math
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from actors.kv.allocator import BlockAllocator
from actors.kv.manager import pages_for
from actors.request import Request, SamplingParams
from actors.runner.model_runner import ModelRunner
from actors.scheduler.plan import BatchPlan, SeqChunk
from actors.slo.latency_model import LatencyModel, ModelSource, Sample, fit, load_or_profile, model_signature, profile_key

if TYPE_CHECKING:
    from actors.engine.core import EngineCore
    from actors.engine.partitioner import Partitioner

_GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


@dataclass(frozen=True)
class ProfileConfig:
    """What to measure. Grid points that do not fit the KV pool or the context are skipped.

    `splits`: prefill SM counts to profile (None: `max_splits` spread over the
    partitioner's; 7 of the H200's 13 is every other one, so that decode partitions of 20-52 SMs, where
    chat loads put the policy, are measured rather than interpolated: with 4 (decode on 20, 52, 84, 116), run 7's chat TPOT at 28-44
    decode SMs was 1.1-1.5x the fit's prediction). `decode_context` is per sequence. `background_*` is the load of the
    other phase while contention is measured.
    """

    prefill_tokens: tuple[int, ...] = (128, 512, 2048, 4096)
    prefill_cached: tuple[int, ...] = (0, 2048)
    decode_batches: tuple[int, ...] = (1, 16, 64, 128)
    decode_context: tuple[int, ...] = (256, 2048)
    splits: tuple[int, ...] | None = None
    max_splits: int = 7
    repeats: int = 3
    warmup: int = 1
    contention: bool = True
    background_prefill_tokens: int = 2048
    background_decode: tuple[int, int] = (64, 1024)  # (batch, context per sequence)

    def __post_init__(self) -> None:
        if min(self.prefill_tokens, default=0) < 1 or min(self.decode_batches, default=0) < 1:
            raise ValueError("prefill_tokens and decode_batches must be non-empty and positive")
        if min(self.decode_context, default=0) < 1 or min(self.prefill_cached, default=-1) < 0:
            raise ValueError("decode_context must be positive and prefill_cached non-negative")
        if self.repeats < 1 or self.warmup < 0 or self.max_splits < 1:
            raise ValueError("repeats and max_splits must be >= 1, warmup >= 0")

    @classmethod
    def quick(cls) -> ProfileConfig:
        """A small grid for CPU and tests: a couple of seconds on a tiny model."""
        return cls(prefill_tokens=(16, 64, 256), prefill_cached=(0, 128), decode_batches=(1, 4, 16),
                   decode_context=(32, 256), max_splits=2, repeats=3, warmup=1,
                   background_prefill_tokens=128, background_decode=(4, 64))


def device_name(device: torch.device) -> str:
    """The profile's device key: the GPU's name, or the CPU's machine type and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine() or 'unknown'}-{torch.get_num_threads()}t"


def spread(splits: tuple[int, ...], n: int) -> tuple[int, ...]:
    """`n` splits evenly spread over `splits`, ends included."""
    if n >= len(splits):
        return splits
    if n == 1:
        return (splits[len(splits) // 2],)
    return tuple(sorted({splits[round(i * (len(splits) - 1) / (n - 1))] for i in range(n)}))


class Profiler:
    """Measures one engine's runners; `run()` returns the fitted `LatencyModel`."""

    def __init__(
        self,
        prefill_runner: ModelRunner,
        decode_runner: ModelRunner,
        partitioner: Partitioner,
        allocator: BlockAllocator,
        max_model_len: int,
        model: str,
        config: ProfileConfig | None = None,
    ) -> None:
        self.prefill_runner = prefill_runner
        self.decode_runner = decode_runner
        self.partitioner = partitioner
        self.allocator = allocator
        self.max_model_len = max_model_len
        self.model = model
        self.config = config or ProfileConfig()
        self.page_size = prefill_runner.pool.page_size
        self.device = prefill_runner.device
        self.device_name = device_name(self.device)
        self.vocab = prefill_runner.model.arch.vocab_size
        self.samples: list[Sample] = []
        # Background loads take at most a quarter of the pool each, so the grid still fits.
        quarter = max(1, allocator.num_free // 4)
        batch, ctx = self.config.background_decode
        ctx = max(1, min(ctx, max_model_len - 1, quarter * self.page_size))
        batch = max(1, min(batch, quarter // pages_for(ctx, self.page_size)))
        self._bg_decode = (batch, ctx)
        self._bg_prefill_tokens = max(1, min(self.config.background_prefill_tokens, max_model_len - 1,
                                             quarter * self.page_size))

    @classmethod
    def for_engine(cls, core: EngineCore, config: ProfileConfig | None = None) -> Profiler:
        """A profiler over an engine's runners (prefill and decode; unified: the one runner)."""
        if any(w.thread is not None and w.thread.is_alive() for w in core.workers):
            raise RuntimeError("profile an engine before its workers start")
        runners = {w.name: w.runner for w in core.workers}
        prefill = runners.get("prefill", runners.get("unified"))
        decode = runners.get("decode", prefill)
        assert prefill is not None and decode is not None
        model = model_signature(core.arch, str(core.dtype).removeprefix("torch."))
        return cls(prefill, decode, core.partitioner, core.allocator, core.max_model_len, model, config)

    @property
    def partitioned(self) -> bool:
        """Whether the phases run on SM partitions (a GPU in semi-pd mode); on CPU they do not."""
        return self.partitioner.partition_for("prefill").stream is not None and self.decode_runner is not self.prefill_runner

    @property
    def key(self) -> str:
        return profile_key(self.device_name, self.model, self.partitioner.splits)

    def run(self) -> LatencyModel:
        """Measure every grid point under each profiled split, then fit."""
        fitting = {"prefill": len(list(self._prefill_points())), "decode": len(list(self._decode_points()))}
        if min(fitting.values()) < 3:
            raise ValueError(f"only {fitting} grid points fit this engine (context {self.max_model_len} tokens, "
                             f"{self.allocator.num_free} free KV pages); a fit needs 3 per phase: "
                             "profile on a smaller grid (serve --profile-grid quick)")
        t0 = time.perf_counter()
        samples = self.measure()
        meta = {"profiled_splits": sorted({s.sms for s in samples if s.phase == "prefill"}),
                "seconds": round(time.perf_counter() - t0, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__}
        return fit(samples, self.device_name, self.model, self.partitioner.total_sms, self.partitioner.splits, meta)

    def measure(self) -> list[Sample]:
        """Time every grid point under each profiled split (the split is restored after)."""
        cfg = self.config
        if cfg.splits is not None:
            splits = cfg.splits
        elif self.partitioned:
            splits = spread(self.partitioner.splits, cfg.max_splits)
        else:
            splits = (self.partitioner.current,)  # no SM partitions: the split cannot change the speed
        concurrent = cfg.contention and self.decode_runner is not self.prefill_runner
        self.samples = []
        original = self.partitioner.current
        try:
            # Solo points first, then loaded ones: a just-stopped background load (a CPU
            # thread pool still spinning) must not leak into solo timings.
            for background in ((None, "decode", "prefill") if concurrent else (None,)):
                for s in splits:
                    self._use_split(s)
                    self._measure_split(background)
        finally:
            self._use_split(original)
        return list(self.samples)

    def _measure_split(self, background: str | None) -> None:
        """Solo points of both phases (background None), or one phase under the other's load."""
        psms, total = self.partitioner.current, self.partitioner.total_sms
        dsms = total if self.decode_runner is self.prefill_runner else max(1, total - psms)  # unified: all SMs
        loaded = background is not None
        if background in (None, "decode"):
            with self._background(background) if loaded else nullcontext():
                self._measure_points("prefill", list(self._prefill_points()), psms, loaded)
        if background in (None, "prefill"):
            with self._background(background) if loaded else nullcontext():
                self._measure_points("decode", list(self._decode_points()), dsms, loaded)

    # -- grid ------------------------------------------------------------------------

    def _fits(self, pages: int, background: str) -> bool:
        return pages + self._background_pages(background) <= self.allocator.num_free

    def _prefill_points(self) -> Iterator[tuple[int, int]]:
        for tokens in self.config.prefill_tokens:
            for cached in self.config.prefill_cached:
                pages = pages_for(tokens + cached, self.page_size)
                if tokens + cached < self.max_model_len and self._fits(pages, "decode"):
                    yield tokens, cached

    def _decode_points(self) -> Iterator[tuple[int, int]]:
        for batch in self.config.decode_batches:
            for ctx in self.config.decode_context:
                if ctx < self.max_model_len and self._fits(batch * pages_for(ctx, self.page_size), "prefill"):
                    yield batch, ctx

    # -- measurement -------------------------------------------------------------------

    def _use_split(self, prefill_sms: int) -> None:
        if self.partitioner.current != prefill_sms:
            self.partitioner.switch(prefill_sms, reason="profile")
        self.prefill_runner.set_partition(self.partitioner.partition_for("prefill"))
        if self.decode_runner is not self.prefill_runner:
            self.decode_runner.set_partition(self.partitioner.partition_for("decode"))

    def _measure_points(self, phase: str, points: list[tuple[int, int]], sms: int, concurrent: bool) -> None:
        """`warmup + repeats` round-robin passes over `points`; each keeps its best time.

        The best, not the median: interference (another process taking the CPU, a
        thread pool still spinning) only ever adds time. Spreading a point's repeats
        over whole passes makes a stall hit several points once, not one point always.
        """
        best = [math.inf] * len(points)
        for rep in range(self.config.warmup + self.config.repeats):
            for i, point in enumerate(points):
                ms = self._time_point(phase, point)
                if rep >= self.config.warmup:
                    best[i] = min(best[i], ms)
        for (x0, x1), ms in zip(points, best):
            if phase == "prefill":
                self.samples.append(Sample.prefill(x0, x1, sms, ms, concurrent))
            else:
                self.samples.append(Sample.decode(x0, x0 * x1, max(1, sms), ms, concurrent))

    def _time_point(self, phase: str, point: tuple[int, int]) -> float:
        """One timed iteration (ms): prefill (tokens, cached) or decode (batch, context per sequence)."""
        if phase == "prefill":
            tokens, cached = point
            with self._pages(pages_for(tokens + cached, self.page_size)) as pages:
                plan, reqs = self._prefill_plan(tokens, cached, pages)
                return self._time(self.prefill_runner, plan, reqs)
        batch, ctx = point
        per = pages_for(ctx, self.page_size)
        with self._pages(batch * per) as pages:
            plan, reqs = self._decode_plan(batch, ctx, [pages[i * per:(i + 1) * per] for i in range(batch)])
            return self._time(self.decode_runner, plan, reqs)

    def _prefill_plan(self, tokens: int, cached: int, pages: list[int]) -> tuple[BatchPlan, list[Request]]:
        ids = self._token_ids(cached + tokens)
        chunk = SeqChunk("profile-prefill", tuple(ids[cached:]), cached, tuple(pages), True)
        return BatchPlan(prefills=(chunk,)), [self._request("profile-prefill", ids)]

    def _decode_plan(self, batch: int, ctx: int, tables: list[list[int]]) -> tuple[BatchPlan, list[Request]]:
        ids = self._token_ids(ctx)
        chunks = tuple(SeqChunk(f"profile-decode-{i}", (ids[-1],), ctx - 1, tuple(t), True) for i, t in enumerate(tables))
        return BatchPlan(decodes=chunks), [self._request(c.request_id, ids) for c in chunks]

    def _token_ids(self, n: int) -> list[int]:
        return [(7 * i + 3) % max(2, self.vocab) for i in range(n)]

    @staticmethod
    def _request(rid: str, ids: list[int]) -> Request:
        return Request(rid, list(ids), num_prompt_tokens=len(ids), params=_GREEDY)

    def _time(self, runner: ModelRunner, plan: BatchPlan, reqs: list[Request]) -> float:
        """Wall time of one `execute` (ms), synchronized with the runner's stream."""
        t0 = time.perf_counter()
        self._execute(runner, plan, reqs)
        return (time.perf_counter() - t0) * 1e3

    def _execute(self, runner: ModelRunner, plan: BatchPlan, reqs: list[Request]) -> None:
        runner.execute(plan, reqs)
        if self.device.type == "cuda":
            if runner.stream is not None:
                runner.stream.synchronize()
            else:
                torch.cuda.synchronize(self.device)

    @contextmanager
    def _pages(self, n: int) -> Iterator[list[int]]:
        pages = self.allocator.allocate(n)
        if pages is None:
            raise RuntimeError(f"profiler needs {n} free KV pages, {self.allocator.num_free} free")
        try:
            yield pages
        finally:
            self.allocator.free(pages)

    @contextmanager
    def _background(self, phase: str) -> Iterator[None]:
        """Loop `phase`'s iterations in a thread (on its own partition) while the body runs."""
        stop, started = threading.Event(), threading.Event()
        errors: list[BaseException] = []
        with self._pages(self._background_pages(phase)) as pages:
            if phase == "decode":
                batch, ctx = self._bg_decode
                per = pages_for(ctx, self.page_size)
                plan, reqs = self._decode_plan(batch, ctx, [pages[i * per:(i + 1) * per] for i in range(batch)])
                runner = self.decode_runner
            else:
                plan, reqs = self._prefill_plan(self._bg_prefill_tokens, 0, pages)
                runner = self.prefill_runner

            def loop() -> None:
                try:
                    while not stop.is_set():
                        self._execute(runner, plan, reqs)
                        started.set()
                except BaseException as e:  # re-raised by the caller below
                    errors.append(e)
                    started.set()

            thread = threading.Thread(target=loop, name=f"semipd-profile-{phase}", daemon=True)
            thread.start()
            started.wait()  # the other phase has run once: it is loaded now
            try:
                yield
            finally:
                stop.set()
                thread.join()
        if errors:
            raise RuntimeError(f"background {phase} failed during profiling") from errors[0]

    def _background_pages(self, phase: str) -> int:
        if phase == "decode":
            batch, ctx = self._bg_decode
            return batch * pages_for(ctx, self.page_size)
        return pages_for(self._bg_prefill_tokens, self.page_size)


def profile_engine(core: EngineCore, config: ProfileConfig | None = None) -> LatencyModel:
    """Profile an engine that has not started yet."""
    return Profiler.for_engine(core, config).run()


def engine_profile_key(core: EngineCore) -> str:
    """The key `profile_engine(core)` saves its model under."""
    model = model_signature(core.arch, str(core.dtype).removeprefix("torch."))
    return profile_key(device_name(core.device), model, core.partitioner.splits)



def engine_latency_model(core: EngineCore, source: ModelSource | None = None) -> LatencyModel:
    """The latency model of an engine that has not started yet: the one its admission control
    already holds, else `source.path`'s profile for it, else a fresh profile on `source.grid`
    (saved to `source.path` when set)."""
    source = source or ModelSource()
    if core.admission is not None:
        return core.admission.controller.model
    grid = ProfileConfig.quick() if source.grid == "quick" else ProfileConfig()
    return load_or_profile(source.path, engine_profile_key(core), lambda: profile_engine(core, grid))
