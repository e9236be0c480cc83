"""EngineCore: one device's engine. Token ids in, `TokenDelta`s out, no Ray/Redis/gRPC.

Builds the model, the KV pool with its allocator, the prefill and decode schedulers,
the SM partitioner, one model runner per worker, and the workers for the chosen mode.
Outputs go to the `emit` callback from worker threads; text, stop strings and
streaming live in the front end (`actors.engine.frontend`).
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.config import ConfigError, EngineConfig, ModelArch, check_decode_reserve
from actors.engine.pauses import PauseWatch
from actors.engine.partitioner import Partitioner, SwitchRecord, make_partitioner
from actors.engine.workers import (
    DecodeWorker, Emit, PrefillWorker, RecentIterations, UnifiedWorker, Wakeup, Worker, discard,
)
from actors.kv.allocator import BlockAllocator
from actors.kv.manager import KVManager, pages_for
from actors.kv.pool import KVPool
from actors.models.loader import build_model
from actors.request import FinishReason, Request, SamplingParams, TokenDelta
from actors.runner.cublas import release_workspaces, set_sm_count_target
from actors.runner.model_runner import ModelRunner
from actors.runner.sampler import Sampler
from actors.runner.transfer import pinned_host_allocs
from actors.scheduler.decode import DecodeScheduler
from actors.scheduler.plan import BatchPlan, SeqChunk
from actors.scheduler.prefill import PrefillScheduler
from actors.slo.admission import EngineAdmission
from actors.slo.ordering import OrderKey, make_order
from actors.structured import GrammarCompiler

log = logging.getLogger(__name__)
PREFILL_SPEED_SPAN_S = 5.0  # the prefill iterations an engine's stats average (`EngineStats.recent_prefill_ms`) ...
PREFILL_SPEED_MIN_ITERATIONS = 3  # ... given at least this many on the current split
RECENT_SWITCHES = 64  # split changes a stats snapshot carries (the controller changes at most one per dwell)


class EngineDeadError(RuntimeError):
    """The engine's GPU failed for good (a sticky CUDA error): it takes no requests, and only a new
    process can serve again."""


class PromptTooLongError(ValueError):
    """The prompt (plus max_tokens) exceeds the context; message in vLLM's wording."""


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """Raise PromptTooLongError (vLLM's wording, which clients match) if the request cannot fit the context.

    `max_tokens` None means "as many as fit": then only the prompt itself is checked.
    """
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    if num_prompt_tokens >= max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens. Please reduce the length of the input messages."
        )


def default_max_tokens(num_prompt_tokens: int, max_model_len: int, default: float | None) -> int:
    """The max_tokens of a request that left it unset, as vLLM has it: `default` (the checkpoint's max_new_tokens,
    or the interface's own) capped by the room the prompt leaves in the context; the whole room without one."""
    room = max_model_len - num_prompt_tokens
    return room if default is None else min(room, int(default))


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for load balancing, metrics and the SLO controller."""

    num_waiting: int
    num_prefilling: int
    num_decoding: int
    waiting_prefill_tokens: int
    decode_context_tokens: int
    kv_usage: float
    num_pages: int
    prefix_queried_tokens: int  # prompt tokens of admitted requests ...
    prefix_hit_tokens: int  # ... and those of them the prefix cache served
    prefill_sms: int
    total_sms: int
    num_switches: int
    seconds_since_progress: float
    iterations: dict[str, int]
    busy_seconds: dict[str, float]
    iteration_counts: dict[str, list[int]] = field(default_factory=dict)  # per worker: iterations per bucket of ITERATION_BUCKETS_S
    tokens: dict[str, int] = field(default_factory=dict)  # per worker: tokens computed ...
    launch_seconds: dict[str, float] = field(default_factory=dict)  # ... and host time queueing its iterations
    launch_parts: dict[str, dict[str, float]] = field(default_factory=dict)  # ... by part (`ModelRunner.host_seconds`)
    num_switch_stalls: int = 0  # SM splits adopted by the workers (Worker.adopt_seconds) ...
    switch_stall_seconds: float = 0.0  # ... and the total time the adoptions took
    switches: tuple[SwitchRecord, ...] = ()  # the last RECENT_SWITCHES split changes, oldest first
    num_preemptions: int = 0  # requests preempted so far (pages released for recomputation), both phases
    # torch's CUDA caching allocator (0 off the GPU): cudaMalloc calls (the cache growing: each stream has a pool
    # of its own, so a split's first iterations allocate), those that failed and were retried after freeing the
    # cache, and cudaFree calls; each free synchronizes the whole device, so every worker's stream waits for
    # every other's queued work
    cuda_mallocs: int = 0
    cuda_alloc_retries: int = 0
    cuda_frees: int = 0
    cuda_host_allocs: int = 0  # cudaHostAlloc calls of torch's pinned allocator (process-wide; serving makes none)
    recent_decode_step_ms: float = 0.0  # the decode worker's mean iteration over the last 2 s (0: none, or unified)
    # the prefill worker's mean iteration over the last PREFILL_SPEED_SPAN_S on the current split, and its mean
    # tokens (0: fewer than PREFILL_SPEED_MIN_ITERATIONS there, or unified): the speed the split policy compares
    # with its model's
    recent_prefill_ms: float = 0.0
    recent_prefill_tokens: float = 0.0
    decode_pace_ms: float = 0.0  # the decode worker's pace while prefill has work (0: none; `StepPacer`) ...
    paced_seconds: dict[str, float] = field(default_factory=dict)  # ... and per paced worker the time it waited
    # admitted requests' TTFT over admission's prediction: {"counts" per bucket of TTFT_RATIO_BOUNDS, "sum"}
    # (`EngineAdmission.ttft_over_predicted`; {}: no admission control)
    admission_ttft_ratio: dict[str, Any] = field(default_factory=dict)


class EngineCore:
    admits_prefills = True  # its prefill scheduler admits requests (their first pages come from this pool)

    def __init__(self, config: EngineConfig, emit: Emit, order: OrderKey | None = None) -> None:
        self.config = config
        self.arch = ModelArch.from_dir(config.model).with_eos_token_id(config.tokenizer_eos_token_id)
        self.device = config.resolved_device
        self.dtype = config.torch_dtype(self.arch)
        self.max_model_len = config.max_model_len(self.arch)
        if self.max_model_len > self.arch.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                f"{self.arch.max_position_embeddings}"
            )
        self._emit = emit
        if self.device.type == "cuda" and config.resolved_backend == "flashinfer":
            self._build_kernels()
        weights_dir = None if config.load_format == "dummy" else config.model
        self.model = build_model(self.arch, self.dtype, self.device, self.max_model_len, weights_dir, config.seed,
                                 ops=config.resolved_backend)
        page_size = config.cache.page_size
        num_pages = self._num_pages()
        if self.admits_prefills:
            check_decode_reserve(config.scheduler.decode_reserve_pages, num_pages)
        self.pool = KVPool(self.arch, num_pages, page_size, self.dtype, self.device)
        self.allocator = BlockAllocator(self.pool.num_pages, config.cache.enable_prefix_caching)
        kv = KVManager(self.allocator, page_size)
        sched = config.scheduler
        if order is None:  # prefill order from config.slo: fcfs or edf
            order = make_order(config.slo.order, config.slo.ttft_ms, config.slo.aging_s)
        self.prefill = PrefillScheduler(kv, sched.max_prefill_tokens, sched.decode_reserve_pages, order)
        self.decode = DecodeScheduler(kv, sched.max_decode_seqs)
        self.partitioner: Partitioner = make_partitioner(self.device, config.mode, config.prefill_sms, config.splits)
        self.grammars = GrammarCompiler(config.model, self.arch.vocab_size, self.arch.eos_token_ids)
        self.workers = self._make_workers()
        self._warm_up()
        self._requests: dict[str, Request] = {}
        self._lock = threading.Lock()
        self.device_error: BaseException | None = None  # set once, when the GPU is lost
        self.on_device_lost: Callable[[BaseException], None] = discard  # the owner's hook (a Ray actor exits)
        for w in self.workers:
            w.on_device_lost = self._device_lost
        self._started = False
        self.pauses = PauseWatch()  # runs while the workers do
        self.admission = EngineAdmission.for_engine(self) if config.slo.admission else None  # profiles if needed

    # -- construction ------------------------------------------------------------

    def _build_kernels(self) -> None:
        """flashinfer's kernels, built side by side (`actors.runner.jit_warmup`), or loaded where built before."""
        from actors.runner.jit_warmup import flashinfer_first_uses, run_in_parallel

        t0 = time.perf_counter()
        each = run_in_parallel(flashinfer_first_uses(self.arch, self.dtype, self.device, self.config.decode_attention))
        log.info("flashinfer kernels ready in %.1f s (each: %s s)", time.perf_counter() - t0,
                 ", ".join(f"{s:.1f}" for s in each))

    def _num_pages(self) -> int:
        cache = self.config.cache
        if cache.num_pages is not None:
            return cache.num_pages
        per_page = KVPool.bytes_per_page(self.arch, cache.page_size, self.dtype)
        if self.device.type == "cuda":
            gc.unfreeze()  # an engine dropped without shutdown() sits in reference cycles, frozen (`start`),
            gc.collect()  # until collected
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            a = self.arch
            elem = torch.tensor([], dtype=self.dtype).element_size()
            activations = self.config.scheduler.max_prefill_tokens * (4 * a.intermediate_size + 8 * a.hidden_size) * elem
            budget = free - (1.0 - cache.memory_fraction) * total - activations - (1 << 30)
        else:
            budget = cache.cpu_kv_bytes
        pages = int(budget // per_page) - 1  # one page stays scratch
        if pages < 2:
            raise ConfigError(f"not enough memory for a KV cache ({budget / 2**30:.2f} GiB left after the weights)")
        return pages

    def _make_runner(self, decodes: bool) -> ModelRunner:
        """A runner with its own attention workspace; with CUDA graphs if it runs decodes on a GPU, and, if it runs
        prefills only (semi-PD's prefill worker) on a GPU, held to `prefill_layers_ahead` layers queued."""
        from actors.attention import make_backend

        backend = make_backend(self.config.resolved_backend, self.pool, self.arch, self.config.decode_attention)
        graphs = None
        if decodes and self.config.cuda_graphs and backend.name == "flashinfer":
            from actors.runner.cuda_graphs import DecodeGraphs

            max_pages = pages_for(self.max_model_len, self.pool.page_size)
            graphs = DecodeGraphs(self.model, backend, self.pool, self.config.scheduler.max_decode_seqs, max_pages)
            t0 = time.perf_counter()
            for part in self.partitioner.all_partitions("decode"):
                set_sm_count_target(part.gemm_sms, self.device)
                graphs.capture_all(part.stream)
            set_sm_count_target(self.partitioner.total_sms, self.device)
            torch.cuda.synchronize(self.device)
            log.info("captured %d decode CUDA graphs in %.1f s", len(graphs.graphs), time.perf_counter() - t0)
        window = None
        if not decodes and self.config.prefill_layers_ahead > 0 and self.device.type == "cuda":
            from actors.runner.launch_window import LaunchWindow

            window = LaunchWindow(self.config.prefill_layers_ahead)
        return ModelRunner(self.model, self.pool, backend, Sampler(self.device, self.config.seed), graphs=graphs,
                           window=window)

    def _make_workers(self) -> list[Worker]:
        emit, parts = self._emit_and_forget, self.partitioner
        if self.config.mode == "unified":
            wake = Wakeup()
            wakeups = {"unified": wake, "prefill": wake, "decode": wake}
            return [UnifiedWorker(self.prefill, self.decode, self._make_runner(True), parts, emit, wakeups,
                                  overlap=self.config.overlap_decode)]
        wakeups = {"prefill": Wakeup(), "decode": Wakeup()}
        decode = DecodeWorker(self.prefill, self.decode, self._make_runner(True), parts, emit, wakeups,
                              overlap=self.config.overlap_decode)
        decode.pace(self.config.decode_pace_ms)
        return [PrefillWorker(self.prefill, self.decode, self._make_runner(False), parts, emit, wakeups,
                              overlap=self.config.overlap_prefill), decode]

    def _warm_up(self) -> None:
        """Prefills through each prefill-running worker, and draws through every worker, before the engine reports
        ready, so that the first requests do not pay for what the first iteration does once: load (or, with a cold
        cache, compile) kernels. On a GPU the largest prefill is as large as the token budget (and half the pool)
        allows, like the engine's largest iteration, so the caching allocator also grows to its working size and
        cuBLAS meets the large shapes (H200, 2026-12-03, before this: the offline job took 5.08 s after a warm-up of
        8 of its prompts, 4.94 s after one of the whole job).

        On a GPU they run on every partition the worker may move to, at sizes down to a few tokens
        (`warm_up_sizes`; up to `OTHER_SPLITS_WARM_UP_TOKENS` on splits other than the starting one): cuBLAS picks
        its kernels by shape and by the SMs a partition's GEMMs are sized for, CUDA loads a kernel at its first
        launch, which may wait for the whole device, and torch's allocator keeps a pool per stream. On the H200
        (2026-12-04, run 20) a move from 64 to 72 prefill SMs, a split not used before, under chat at 40 req/s
        was followed by a second in which decode streamed half its tokens (mean ITL 20 ms in its second half
        second), where 72 held throughout ran at 10-11 ms; with every split warmed (run 21) a split's first use
        cost decode under 1 ms, so that drop was the move itself.

        Every worker, decode's too, then draws on each of its partitions from as many rows as a batch may sample
        (`warm_up_rows`, `ModelRunner.warm_up_draws`; sampled draws, not only greedy ones, on its current partition):
        the LM head and the sampler run outside the CUDA graphs with one row per sequence that samples, where the
        warm-up's prefills sample one or two.

        Pinned host memory is not allocated while serving (a page-locked allocation keeps two streams' commands
        from running concurrently): host values travel through each thread's staging ring (`staging_ring`): this
        thread's is made by the warm-up (or the graph captures), each worker's as its thread starts (`Worker.start`)."""
        ps = self.pool.page_size
        on_gpu = self.device.type == "cuda"
        largest = self.config.scheduler.max_prefill_tokens if on_gpu else ps + 1
        max_pages = max(1, self.allocator.num_free // 2)
        rows = warm_up_rows(self.config.scheduler.max_decode_seqs) if on_gpu else (1,)
        # the sampler's own kernels (a sort, softmaxes) do not depend on the SMs cuBLAS sizes for: one partition, and
        # row counts at powers of two (their kernels go by size class), so that its buffers of up to a GB for 256
        # rows are cached on one stream's pool only
        sampled_rows = tuple(n for n in rows if n & (n - 1) == 0)
        t0, tokens_run, partitions = time.perf_counter(), 0, 0
        for w in self.workers:
            current = self.partitioner.partition_for(w.phase)
            others = [p for p in self.partitioner.all_partitions(w.phase) if p != current] if on_gpu else []
            for part in [current] + others:
                w.runner.set_partition(part)
                partitions += 1
                if w.phase == "prefill":
                    sizes = (warm_up_sizes(largest) if on_gpu else (largest,)) if part == current else (
                        warm_up_sizes(min(largest, OTHER_SPLITS_WARM_UP_TOKENS)))
                    for tokens in sizes:
                        lens = warm_up_lengths(tokens, self.max_model_len - 1, max_pages, ps)
                        self._warm_up_prefill(w.runner, lens)
                        tokens_run += sum(lens)
                w.runner.warm_up_draws(rows, sampled_rows if part == current else ())
            w.runner.set_partition(current)
        if on_gpu:
            torch.cuda.synchronize(self.device)
            log.info("warm-up: %d prefill tokens and draws of 1-%d rows over %d partitions in %.1f s; %d cudaHostAlloc "
                     "calls so far", tokens_run, rows[-1], partitions, time.perf_counter() - t0, pinned_host_allocs())

    def _warm_up_prefill(self, runner: ModelRunner, lens: list[int]) -> None:
        """One prefill iteration of prompts of `lens` tokens, on pages freed afterwards."""
        ps = self.pool.page_size
        vocab = self.arch.vocab_size
        pages = [self.allocator.allocate(pages_for(n, ps)) for n in lens]
        assert all(p is not None for p in pages), "a fresh pool holds the warm-up's prompts"
        chunks = [SeqChunk(f"warm-up-{i}", tuple(1 + t % (vocab - 1) for t in range(n)), 0, tuple(p or ()), True)
                  for i, (n, p) in enumerate(zip(lens, pages))]
        reqs = [Request(c.request_id, list(c.token_ids), c.num_tokens, SamplingParams(max_tokens=1, temperature=0.0))
                for c in chunks]
        runner.execute(BatchPlan(prefills=tuple(chunks)), reqs)
        for blocks in pages:
            self.allocator.free(blocks or ())

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the workers. What exists by then (the weights' modules, graphs, tokenizer) lives as long as the
        engine, so it is moved out of the cyclic collector's way (`gc.freeze`): a full collection during serving
        then scans only what serving made (on CPU, one took 213 ms over the 334K objects of a tiny-model engine's
        process, holding the interpreter lock that the workers need to launch)."""
        if not self._started:
            self._started = True
            if self.config.switch_interval_ms is not None:
                sys.setswitchinterval(self.config.switch_interval_ms / 1000)
            gc.collect()
            gc.freeze()
            self.pauses.start()
            try:
                for w in self.workers:
                    w.start()
            except BaseException:
                self.shutdown()  # a worker that could not start leaves none running
                raise
            self.grammars.prepare_in_background()

    def shutdown(self) -> None:
        """Stop the workers, then give back what the engine holds on the device beyond its own
        objects: its CUDA graphs' pool and the cuBLAS workspaces torch cached for its streams.

        Nothing is emitted afterwards: the references that closed cycles through the engine (its
        front end's callback, the admission controller, the workers' callbacks) are dropped, so
        the weights, the KV pool and the attention workspaces go with the last reference to the
        front end instead of waiting for the cyclic garbage collector.
        """
        stopped = [w.stop() for w in self.workers]
        self._started = False
        self.pauses.stop()
        gc.unfreeze()  # the engine's objects can be collected again
        if not all(stopped):
            log.error("a worker did not stop; the engine's CUDA graphs and cuBLAS workspaces stay allocated")
            return
        self._emit = discard
        self.admission = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for w in self.workers:
                w.runner.release_graphs()
            release_workspaces()

    # -- requests ----------------------------------------------------------------

    def validate(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Raise PromptTooLongError / ValueError if the request cannot be served."""
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        check_context_length(num_prompt_tokens, params.max_tokens, self.max_model_len)
        params.check_first_token(self.arch.eos_token_ids)
        kv_tokens = num_prompt_tokens + params.max_tokens - 1  # the last token is sampled, never cached
        if pages_for(kv_tokens, self.pool.page_size) > self.pool.num_pages:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the KV cache holds only "
                f"{self.pool.num_pages * self.pool.page_size} tokens, fewer than the {kv_tokens} this request needs "
                f"({num_prompt_tokens} in the messages, {params.max_tokens} in the completion)."
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        deadline: float | None = None,
    ) -> None:
        """Queue a request; raises ValueError (and queues nothing) if it is invalid,
        AdmissionRejected (a ValueError) if admission control refuses it, EngineDeadError once the
        GPU is lost."""
        self.refuse_if_dead()
        self.validate(len(prompt_token_ids), params)
        if any(t < 0 or t >= self.arch.vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.arch.vocab_size})")
        params.check_vocab(self.arch.vocab_size)
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        req = Request(
            request_id=request_id,
            token_ids=list(prompt_token_ids),
            num_prompt_tokens=len(prompt_token_ids),
            params=params,
            eos_token_ids=self.arch.eos_token_ids,
            max_model_len=self.max_model_len,
            priority=priority,
            deadline=deadline,
            requested_priority=priority,
            generator=gen,
            grammar=grammar,
        )
        if self.admission is not None:
            req.priority = self.admission.admit(req)
        with self._lock:  # again: a worker may have lost the GPU (`_device_lost`) and ended every request since
            self.refuse_if_dead()
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._requests[request_id] = req
        self.prefill.add(req)
        for w in self.workers:
            w.wakeups["prefill"].set()

    def refuse_if_dead(self) -> None:
        """EngineDeadError once the GPU is lost (`_device_lost`): nothing would run a new request."""
        if self.device_error is not None:
            raise EngineDeadError(f"the engine's GPU failed ({self.device_error}); it takes no more requests")

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """Stop a request at its owner's next iteration boundary; its pages are freed then."""
        with self._lock:
            req = self._requests.get(request_id)
        if req is None or req.finished:
            return False
        req.abort(reason)
        for w in self.workers:
            w.wakeups[w.name].set()
        return True

    def _device_lost(self, error: BaseException) -> None:
        """A worker found the GPU unusable (`device_lost`): stop every worker, end every unfinished
        request with an error (nothing will run it here), refuse new ones, and tell the owner, who
        can only start another process. Called from a worker's thread; the first call counts."""
        with self._lock:
            if self.device_error is not None:
                return
            self.device_error = error
            lost = [r for r in self._requests.values() if not r.finished]
        log.critical("the GPU failed for good (%s): failing %d requests, stopping the engine", error, len(lost))
        for w in self.workers:
            w.stop_event.set()
        for r in lost:
            r.finish_reason = FinishReason.ERROR
        self._emit_and_forget([TokenDelta(r.request_id, (), FinishReason.ERROR,
                                          error=f"engine error: the GPU failed ({error})") for r in lost])
        self.on_device_lost(error)

    def _emit_and_forget(self, deltas: list[TokenDelta]) -> None:
        with self._lock:
            for d in deltas:
                if d.finished:
                    req = self._requests.pop(d.request_id, None)
                    if req is not None and self.admission is not None:
                        self.admission.note_finished(req)
        self._emit(deltas)

    @property
    def decode_stalled_seconds(self) -> float:
        """What the decode worker's stalled iterations took over its median one, so far (`Worker._note_stall`;
        0 without a decode worker)."""
        return next((w.stalled_seconds for w in self.workers if w.name == "decode"), 0.0)

    @property
    def num_preemptions(self) -> int:
        """Requests preempted so far (their pages released for recomputation), both phases."""
        return self.prefill.num_preemptions + self.decode.num_preemptions

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests.values() if not r.finished)

    def stats(self) -> EngineStats:
        a, p = self.allocator, self.prefill
        now = time.monotonic()
        prefill = self.recent_prefill(now)
        pacers = {w.name: w.pacer for w in self.workers if isinstance(w, DecodeWorker) and w.pacer is not None}
        return EngineStats(
            num_waiting=p.num_waiting,
            num_prefilling=len(p.running),
            num_decoding=self.decode.num_running,
            waiting_prefill_tokens=p.waiting_tokens(),
            decode_context_tokens=self.decode.context_tokens(),
            kv_usage=a.usage,
            num_pages=a.num_blocks,
            prefix_queried_tokens=p.prompt_tokens_admitted,
            prefix_hit_tokens=p.cached_tokens_admitted,
            prefill_sms=self.partitioner.current,
            total_sms=self.partitioner.total_sms,
            num_switches=len(self.partitioner.switches),
            seconds_since_progress=max(now - w.last_progress for w in self.workers),  # any hung worker counts
            iterations={w.name: w.iterations for w in self.workers},
            busy_seconds={w.name: w.iteration_times.sum_s for w in self.workers},
            iteration_counts={w.name: list(w.iteration_times.counts) for w in self.workers},
            tokens={w.name: w.tokens for w in self.workers},
            launch_seconds={w.name: sum(w.runner.host_seconds.values()) for w in self.workers},
            launch_parts={w.name: dict(w.runner.host_seconds) for w in self.workers},
            num_switch_stalls=sum(len(w.adopt_seconds) for w in self.workers),
            switch_stall_seconds=sum(sum(w.adopt_seconds) for w in self.workers),
            switches=tuple(self.partitioner.switches[-RECENT_SWITCHES:]),
            num_preemptions=self.num_preemptions,
            recent_decode_step_ms=next(
                (w.recent_iterations(now=now).mean_ms for w in self.workers if w.name == "decode"), 0.0),
            recent_prefill_ms=prefill.mean_ms,
            recent_prefill_tokens=prefill.mean_tokens,
            decode_pace_ms=next((1e3 * p.interval_s for p in pacers.values()), 0.0),
            paced_seconds={name: p.waited_s for name, p in pacers.items()},
            admission_ttft_ratio=self.admission.ttft_over_predicted.to_dict() if self.admission else {},
            **self._allocator_counts(),
        )

    def recent_prefill(self, now: float | None = None) -> RecentIterations:
        """The prefill worker's iterations of the last PREFILL_SPEED_SPAN_S on the current split (zeros when
        there are fewer than PREFILL_SPEED_MIN_ITERATIONS, or no prefill worker)."""
        now = time.monotonic() if now is None else now
        for w in self.workers:
            if w.name == "prefill":
                recent = w.recent_iterations(PREFILL_SPEED_SPAN_S, now=now, this_split=True)
                if recent.count >= PREFILL_SPEED_MIN_ITERATIONS:
                    return recent
        return RecentIterations(0, 0.0, 0.0)

    def prefill_tokens_on_device(self) -> int:
        """Prompt tokens of the prefill worker's iteration still running on the device (0: none, or no prefill
        worker): `PrefillWorker.tokens_on_device`."""
        return sum(w.tokens_on_device() for w in self.workers if isinstance(w, PrefillWorker))

    def _allocator_counts(self) -> dict[str, int]:
        if self.device.type != "cuda":
            return {}
        stats = torch.cuda.memory_stats(self.device)
        return dict(cuda_mallocs=int(stats.get("num_device_alloc", 0)),
                    cuda_alloc_retries=int(stats.get("num_alloc_retries", 0)),
                    cuda_frees=int(stats.get("num_device_free", 0)), cuda_host_allocs=pinned_host_allocs())


OTHER_SPLITS_WARM_UP_TOKENS = 4096  # the largest warm-up iteration on a split other than the starting one


def warm_up_sizes(largest: int, smallest: int = 32) -> tuple[int, ...]:
    """Token counts of the warm-up's iterations on one partition: `largest`, then a quarter of the previous, down
    to `smallest` (cuBLAS's kernels change with the GEMMs' row count)."""
    sizes = [largest]
    while sizes[-1] // 4 >= smallest:
        sizes.append(sizes[-1] // 4)
    return tuple(sizes)


def warm_up_rows(most: int, every_one_to: int = 32, step: int = 8) -> tuple[int, ...]:
    """Row counts of the warm-up's draws (`ModelRunner.warm_up_draws`): each up to `every_one_to`, then every
    `step`, up to `most` (included)."""
    rows = list(range(1, min(most, every_one_to) + 1)) + list(range(every_one_to + step, most, step))
    return tuple(rows + [most] if rows[-1] != most else rows)


def warm_up_lengths(tokens: int, max_len: int, max_pages: int, page_size: int) -> list[int]:
    """Prompt lengths for a warm-up iteration of `tokens` tokens: each at most `max_len`, together in at most
    `max_pages` pages (fewer tokens where they do not fit)."""
    lens: list[int] = []
    while tokens > 0 and max_pages > 0:
        n = min(tokens, max_len, max_pages * page_size)
        lens.append(n)
        tokens -= n
        max_pages -= pages_for(n, page_size)
    return lens
