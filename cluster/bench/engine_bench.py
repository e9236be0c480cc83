"""In-process GPU benchmarks of one engine (issue 3): roofline, prefill, switch stall, offline job.

Every figure is measured here, next to the ceilings measured on the same device in the
same run (device-to-device copy bandwidth, bf16 matmul rate). `run_engine_bench`
returns a plain dict and `write_markdown` records it in docs/perf/ with device, date,
commit and command.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.config import EngineConfig, SchedulerConfig
from actors.engine.core import EngineCore
from actors.engine.workers import Iteration, Worker
from actors.kv.manager import pages_for
from actors.request import Request, SamplingParams
from actors.runner.model_runner import ModelRunner
from actors.scheduler.plan import BatchPlan, SeqChunk
from actors.slo.profiler import device_name
from cluster.bench.offline_job import DECODE_BATCHES, DECODE_CONTEXTS, JOB, OfflineJob, offline_prompts
from cluster.bench.provenance import git_commit
from cluster.bench.telemetry import GpuTelemetry


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # bytes read + written per second, device-to-device copy
    matmul_flops_per_s: float  # bf16 8192^3


def _cuda_time(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median seconds of `fn` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device) -> Ceilings:
    n = 1 << 30  # 2 GiB of bf16 per buffer
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t_copy = _cuda_time(lambda: dst.copy_(src), reps=10)
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    t_mm = _cuda_time(lambda: a @ b, reps=20)
    del a, b
    torch.cuda.empty_cache()
    return Ceilings(copy_bytes_per_s=2 * 2 * n / t_copy, matmul_flops_per_s=2 * 8192**3 / t_mm)


def _weight_bytes_read(core: EngineCore) -> int:
    """Bytes of weights one decode step must read (the embedding table only by row, unless it is the lm_head too)."""
    total = 0
    names = {name for name, _ in core.model.named_parameters()}
    for name, p in core.model.named_parameters():
        if name == "model.embed_tokens.weight" and "lm_head.weight" in names:
            continue
        total += p.numel() * p.element_size()
    return total


def _kv_bytes_per_token(core: EngineCore) -> int:
    a = core.arch
    return a.num_layers * 2 * a.num_kv_heads * a.head_dim * core.pool.kv.element_size()


def _dummy_requests(n: int) -> list[Request]:
    params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    return [Request(f"bench-{i}", [1], 1, params) for i in range(n)]


def _decode_plan(core: EngineCore, batch: int, ctx: int) -> tuple[BatchPlan, list[list[int]]]:
    ps = core.pool.page_size
    chunks, held = [], []
    for i in range(batch):
        blocks = core.allocator.allocate(pages_for(ctx + 1, ps))
        assert blocks is not None, "KV pool too small for the decode benchmark"
        held.append(blocks)
        chunks.append(SeqChunk(f"bench-{i}", (7,), ctx, tuple(blocks), True))
    return BatchPlan(decodes=tuple(chunks)), held


def _time_step(runner: ModelRunner, plan: BatchPlan, reqs: list[Request], warmup: int, reps: int
               ) -> tuple[float, float]:
    """Median wall seconds of a whole step (`runner.launch(plan)` and waiting for its draw: sampling and
    host sync included), and median seconds of the launch alone (host time queueing the step)."""
    for _ in range(warmup):
        runner.execute(plan, reqs)
    times, launches = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        drawn = runner.launch(plan, reqs)
        t1 = time.perf_counter()
        drawn.result()
        times.append(time.perf_counter() - t0)
        launches.append(t1 - t0)
    return statistics.median(times), statistics.median(launches)


def bench_decode(core: EngineCore, ceilings: Ceilings, batches: tuple[int, ...], contexts: tuple[int, ...],
                 reps: int = 30) -> list[dict[str, Any]]:
    """Decode step time (graph replay + sampling + host sync) against the memory roofline."""
    runner = core.workers[-1].runner
    runner.set_partition(core.partitioner.partition_for("decode"))
    rows = []
    for ctx in contexts:
        for bs in batches:
            plan, held = _decode_plan(core, bs, ctx)
            step, _ = _time_step(runner, plan, _dummy_requests(bs), warmup=3, reps=reps)
            for blocks in held:
                core.allocator.free(blocks)
            nbytes = _weight_bytes_read(core) + bs * (ctx + 1) * _kv_bytes_per_token(core)
            roofline = nbytes / ceilings.copy_bytes_per_s
            rows.append(dict(batch=bs, context=ctx, step_ms=step * 1e3, roofline_ms=roofline * 1e3,
                             ratio=step / roofline, tokens_per_s=bs / step))
    return rows


def bench_prefill(core: EngineCore, ceilings: Ceilings, shapes: tuple[tuple[int, int], ...], reps: int = 5
                  ) -> list[dict[str, Any]]:
    """Prefill of `n` requests x `length` tokens in one batch, against the matmul peak."""
    runner = core.workers[0].runner
    runner.set_partition(core.partitioner.partition_for("prefill"))
    a = core.arch
    params = sum(p.numel() for n, p in core.model.named_parameters() if n != "model.embed_tokens.weight")
    rows = []
    for n, length in shapes:
        ps = core.pool.page_size
        chunks, held = [], []
        for i in range(n):
            blocks = core.allocator.allocate(pages_for(length, ps))
            assert blocks is not None
            held.append(blocks)
            tokens = tuple(random.randrange(a.vocab_size) for _ in range(length))
            chunks.append(SeqChunk(f"p{i}", tokens, 0, tuple(blocks), True))
        t, launch = _time_step(runner, BatchPlan(prefills=tuple(chunks)), _dummy_requests(n), warmup=1, reps=reps)
        for blocks in held:
            core.allocator.free(blocks)
        tokens = n * length
        attn_flops = n * 2 * a.num_layers * a.num_heads * a.head_dim * length * length  # causal QK^T + PV
        flops = 2 * params * tokens + attn_flops
        rows.append(dict(requests=n, length=length, tokens=tokens, ms=t * 1e3, launch_ms=launch * 1e3,
                         tokens_per_s=tokens / t,
                         tflops=flops / t / 1e12, pct_of_matmul_peak=100 * flops / t / ceilings.matmul_flops_per_s))
    return rows


def bench_switch_stall(core: EngineCore, dwell_s: float = 0.3) -> dict[str, Any]:
    """Decode 64 requests while 2048-token prompts keep prefill busy, and switch splits: every split once (its
    first use since the engine's warm-up), then every split again. Report what each worker lost.

    `adopt_us`: time a worker spends adopting a new split at its iteration boundary; `first_iter_extra_ms`: how
    much longer its first iteration on the new split took than its median iteration, on first visits and on
    revisits; `slowest_after_ms`: its slowest iteration that started within `dwell_s` of a switch (a first launch
    of a kernel on a split can wait for the whole device, stalling the other worker too).
    """
    splits = [s for s in core.partitioner.splits if 32 <= s <= core.partitioner.total_sms - 32] or list(core.partitioner.splits)
    decode_params = SamplingParams(max_tokens=min(4000, core.max_model_len - 512), temperature=0.0, ignore_eos=True)
    for i in range(64):
        core.add_request(f"sw-{i}", [random.randrange(core.arch.vocab_size) for _ in range(512)], decode_params)
    core.start()
    _wait(lambda: core.decode.num_running == 64, 60, "64 requests to reach decode")
    stop = threading.Event()
    feeder = threading.Thread(target=_keep_prefill_busy, args=(core, stop), daemon=True)
    feeder.start()
    versions: list[tuple[int, bool]] = []  # (split version, first visit)
    for rnd in range(2):
        for sms in splits:
            if core.partitioner.switch(sms, reason="bench"):
                versions.append((core.partitioner.version, rnd == 0))
            time.sleep(dwell_s)
    stop.set()
    feeder.join()
    for i in range(64):
        core.abort(f"sw-{i}")
    switches = core.partitioner.switches  # one per version since the start, in order
    switch_times = {core.partitioner.version - len(switches) + 1 + i: sw.time for i, sw in enumerate(switches)}
    out = {}
    for w in core.workers:
        log = list(w.iteration_log)
        extra = _first_iteration_extras(log)
        out[w.name] = dict(
            adoptions=len(w.adopt_seconds),
            adopt_us_median=1e6 * statistics.median(w.adopt_seconds) if w.adopt_seconds else None,
            adopt_us_max=1e6 * max(w.adopt_seconds) if w.adopt_seconds else None,
            first_iter_extra_ms=_median_ms([extra[v] for v, first in versions if first and v in extra]),
            revisit_first_iter_extra_ms=_median_ms([extra[v] for v, first in versions if not first and v in extra]),
            slowest_after_ms=_median_ms([_slowest_after(log, switch_times, v, dwell_s) for v, f in versions if f]),
            revisit_slowest_after_ms=_median_ms([_slowest_after(log, switch_times, v, dwell_s)
                                                 for v, f in versions if not f]),
        )
    return out


def _keep_prefill_busy(core: EngineCore, stop: threading.Event) -> None:
    """Add a 2048-token prompt (one output token) whenever fewer than two wait, until `stop`."""
    params = SamplingParams(max_tokens=1, temperature=0.0)
    length = min(2048, core.max_model_len - 1)
    for n in itertools.count():
        if stop.wait(0.005):
            return
        if core.prefill.num_waiting < 2:
            core.add_request(f"sw-prefill-{n}", [random.randrange(core.arch.vocab_size) for _ in range(length)], params)


def _first_iteration_extras(log: list[Iteration]) -> dict[int, float]:
    """Per split version: (its first iteration) - (the median iteration), in seconds."""
    if len(log) < 3:
        return {}
    median = statistics.median(it.seconds for it in log)
    return {it.split_version: it.seconds - median for it, prev in zip(log[1:], log[:-1])
            if it.split_version != prev.split_version}


def _slowest_after(log: list[Iteration], switch_times: dict[int, float], version: int, span_s: float) -> float:
    """The slowest iteration that started within `span_s` after switch `version` (NaN if none)."""
    t = switch_times.get(version)
    if t is None:
        return float("nan")
    t_mono = t - time.time() + time.monotonic()  # SwitchRecord times are wall-clock, iterations monotonic
    its = [it.seconds for it in log if t_mono <= it.start < t_mono + span_s]
    return max(its) if its else float("nan")


def _median_ms(seconds: list[float]) -> float:
    finite = [x for x in seconds if math.isfinite(x)]
    return 1e3 * statistics.median(finite) if finite else float("nan")


def bench_decode_loop(model_dir: str, overlap: bool, batches: tuple[int, ...], ctx: int, steps: int = 64,
                      mode: str = "semi-pd") -> list[dict[str, Any]]:
    """Decode step time in the engine's own loop, one step at a time (`overlap=False`) or overlapped.

    `batch` requests of `ctx` prompt tokens are prefilled, and the figure is the median time of the iterations
    that ran the whole batch after every request reached decode (host work included, and hidden behind the GPU
    when overlapped), over `steps` of them: the TPOT a request sees. `semi-pd`: prefill on the largest prefill
    split, then decode on the rest of the GPU once the split moves to the smallest; `unified`: the whole GPU, as
    vLLM's loop runs. Requests that finished prefill first have decoded meanwhile: `mean_context` is the batch's
    mean context then.
    """
    from actors.engine.frontend import LLM

    rows = []
    splits = dict(splits=(1, 1 << 10)) if mode == "semi-pd" else {}
    with LLM(model_dir, mode=mode, load_format="dummy", overlap_decode=overlap,
             scheduler=SchedulerConfig(max_decode_seqs=max(batches)), **splits) as llm:
        core = llm.core
        decode_worker = core.workers[-1]
        vocab = core.arch.vocab_size
        params = SamplingParams(max_tokens=core.max_model_len - ctx, temperature=0.0, ignore_eos=True,
                                detokenize=False)
        for bs in batches:
            if mode == "semi-pd":
                core.partitioner.switch(core.partitioner.splits[-1], reason="decode-loop bench: prefill")
            core.allocator.reset_prefix_cache()
            rids = [f"loop-{bs}-{i}" for i in range(bs)]
            for i, rid in enumerate(rids):
                core.add_request(rid, [(7 * i + j) % vocab for j in range(ctx)], params)
            _wait(lambda: core.decode.num_running == bs, 600, f"{bs} requests to reach decode")
            if mode == "semi-pd":
                core.partitioner.switch(core.partitioner.splits[0], reason="decode-loop bench: decode")
            since, version, mean_context = time.monotonic(), core.partitioner.version, core.decode.context_tokens() / bs
            _wait(lambda: len(_full_steps(decode_worker, version, bs, since)) >= steps, 600,
                  f"{steps} decode steps of {bs}")
            step_s = _full_steps(decode_worker, version, bs, since)[:steps]
            for rid in rids:
                core.abort(rid)
            _wait(lambda: core.num_unfinished == 0, 60, "the aborted requests to end")
            decode_sms = core.partitioner.sms_for("decode") if mode == "semi-pd" else core.partitioner.total_sms
            rows.append(dict(mode=mode, batch=bs, context=ctx, mean_context=mean_context, overlap=overlap,
                             decode_sms=decode_sms, step_ms=statistics.median(step_s) * 1e3, iterations=len(step_s)))
    return rows


def bench_contention(model_dir: str, splits: tuple[int, ...], decode_batch: int, paces_ms: tuple[float, ...],
                     prompts: int = 8, prompt_len: int = 4096, ctx: int = 512) -> list[dict[str, Any]]:
    """Prefill and decode beside each other on each of `splits` (prefill SMs), one engine switched between them:
    `prompts` prompts of `prompt_len` tokens (one output token each) are prefilled with decode idle, then beside
    `decode_batch` requests (`ctx` prompt tokens) decoding back to back, then paced at each of `paces_ms`
    (`DecodeWorker.pace`, as `decode_pace_ms` sets it). Per row: prefill tokens/s from the first prefill
    iteration's start to the last one's end, the decode worker's median iteration in that span and the decode
    batch's context tokens at its start, and the GPU's SM clock and power meanwhile (`GpuTelemetry`; none off a
    GPU)."""
    from actors.engine.frontend import LLM

    rows = []
    with LLM(model_dir, mode="semi-pd", load_format="dummy", splits=tuple(sorted(splits)),
             scheduler=SchedulerConfig(max_decode_seqs=max(1, decode_batch))) as llm:
        conditions: list[tuple[str, float | None]] = [("idle", None), ("back to back", None)]
        conditions += [(f"paced {pace:g} ms", pace) for pace in paces_ms]
        for prefill_sms in splits:
            llm.core.partitioner.switch(prefill_sms, reason="bench")
            for label, pace in conditions:
                batch = 0 if label == "idle" else decode_batch
                rows.append(_contention_row(llm.core, len(rows), label, batch, pace, prompts, prompt_len, ctx))
    return rows


def _contention_row(core: EngineCore, n: int, label: str, batch: int, pace: float | None, prompts: int,
                    prompt_len: int, ctx: int) -> dict[str, Any]:
    """Condition `n` of `bench_contention` (its requests' ids and prompts its own), on the engine's current split."""
    from actors.engine.workers import DecodeWorker

    prefill_worker, decode_worker = core.workers
    assert isinstance(decode_worker, DecodeWorker)
    vocab = core.arch.vocab_size
    decoding = SamplingParams(max_tokens=core.max_model_len - ctx, temperature=0.0, ignore_eos=True,
                              detokenize=False)
    first_token = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    for i in range(batch):
        core.add_request(f"c{n}-d{i}", [(11 * i + j) % vocab for j in range(ctx)], decoding)
    _wait(lambda: core.decode.num_running == batch, 600, f"{batch} requests to reach decode")
    decode_worker.pace(pace)
    core.allocator.reset_prefix_cache()
    t0 = time.monotonic()
    context = core.decode.context_tokens()
    with GpuTelemetry() as telemetry:
        for i in range(prompts):
            core.add_request(f"c{n}-p{i}", [(n + 13 * i + 7 * j) % vocab for j in range(prompt_len)], first_token)
        _wait(lambda: core.num_unfinished == batch, 600, f"{prompts} prompts to be prefilled")
    span = [it for it in list(prefill_worker.iteration_log) if it.start >= t0 and it.tokens > 0]
    start, end = span[0].start, max(it.start + it.seconds for it in span)
    steps = [it.seconds for it in list(decode_worker.iteration_log) if start <= it.start <= end]
    for i in range(batch):
        core.abort(f"c{n}-d{i}")
    _wait(lambda: core.num_unfinished == 0, 60, "the aborted requests to end")
    row = dict(decode=label, decode_batch=batch, decode_context_tokens=context, pace_ms=pace,
               prefill_sms=core.partitioner.current, prompts=prompts, prompt_len=prompt_len,
               prefill_tokens_per_s=prompts * prompt_len / (end - start),
               decode_step_ms=statistics.median(steps) * 1e3 if steps else None,
               paced_s=decode_worker.pacer.waited_s if decode_worker.pacer else 0.0, **telemetry.summary())
    decode_worker.pace(None)
    return row


def _full_steps(worker: Any, split_version: int, batch: int, since: float = 0.0) -> list[float]:
    """Seconds of `worker`'s iterations on split `split_version`, begun at `since` or later, that queued a step
    of `batch` decodes."""
    return [it.seconds for it in list(worker.iteration_log)
            if it.split_version == split_version and it.tokens == batch and it.start >= since]


def _wait(done: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def bench_offline(model_dir: str, mode: str, prefill_sms: list[int | None], job: OfflineJob = JOB,
                  **engine_kwargs: Any) -> list[dict[str, Any]]:
    """The offline job: greedy, ignore_eos, all requests submitted at once; a row per prefill split."""
    from actors.engine.frontend import LLM

    llm = LLM(model_dir, mode=mode, load_format="dummy", **engine_kwargs)
    prompts = offline_prompts(llm.core.arch.vocab_size, job)
    params = SamplingParams(max_tokens=job.output_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:8], params)  # warm-up
    rows = []
    for sms in prefill_sms:
        if sms is not None:
            llm.core.partitioner.switch(sms, reason="offline bench")
        llm.core.allocator.reset_prefix_cache()
        with GpuTelemetry() as telemetry:
            t0, t_mono = time.perf_counter(), time.monotonic()
            outs = llm.generate(prompts, params)
            dt = time.perf_counter() - t0
        generated = sum(len(o.token_ids) for o in outs)
        rows.append(dict(mode=mode, decode_attention=llm.config.decode_attention,
                         prefill_sms=llm.core.partitioner.current, seconds=dt,
                         max_prefill_tokens=llm.config.scheduler.max_prefill_tokens,
                         output_tokens=generated, output_tokens_per_s=generated / dt,
                         total_tokens_per_s=(generated + sum(map(len, prompts))) / dt,
                         phases={w.name: _job_phases(w, t_mono, len(prompts)) for w in llm.core.workers},
                         gpu=telemetry.summary()))
    llm.shutdown()
    return rows


def _peak_clock(row: dict[str, Any]) -> str:
    """The mean SM clock near peak power during an offline run ('-' where it was not sampled)."""
    gpu = row.get("gpu") or {}
    return f"{gpu['peak_sm_clock_mhz']:.0f}" if "peak_sm_clock_mhz" in gpu else "-"


def _job_phases(worker: Worker, since: float, num_requests: int) -> dict[str, float]:
    """Where a worker's time in the offline job went: iterations with prefill chunks (more tokens than the job
    has requests: a decode step has at most one per request) and decode-only steps (for an overlapped step,
    the loop's time per step, which the GPU step sets once the host work hides behind it)."""
    log = [it for it in list(worker.iteration_log) if it.start >= since]
    mixed = [it.seconds for it in log if it.tokens > num_requests]
    steps = [it.seconds for it in log if 0 < it.tokens <= num_requests]
    return dict(prefill_iterations=len(mixed), prefill_s=sum(mixed), decode_steps=len(steps), decode_s=sum(steps),
                decode_step_ms=1e3 * statistics.median(steps) if steps else 0.0)


def make_core(model_dir: str, mode: str, **kwargs: Any) -> EngineCore:
    config = EngineConfig(model=model_dir, mode=mode, load_format="dummy", **kwargs)
    return EngineCore(config, emit=lambda deltas: None)


def in_fresh_process(fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a new (spawned) process; its engine and GPU memory end with it. `timeout`
    (seconds): raise `multiprocessing.TimeoutError` if it has not returned by then. An exception it raises is
    raised here again. The process is killed once the call is over: one whose CUDA context failed may not
    exit on its own, and may not even act on SIGTERM while it is inside the driver.

    One process building engine after engine kept the first one's KV pool on the GPU
    (H200, 2026-12-02: the next engine found -16 GiB for its cache), so every part runs apart.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_call_and_send, args=(send, fn, args, kwargs), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise multiprocessing.TimeoutError(f"{fn.__name__} did not return within {timeout} s")
        try:
            ok, value = receive.recv()
        except EOFError:
            raise RuntimeError(f"{fn.__name__}'s process ended without a result (exit code {child.exitcode})") from None
    finally:
        child.kill()
        child.join(30)
        receive.close()
    if not ok:
        raise value
    return value


def _call_and_send(send: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """In the fresh process: send (True, result) or (False, the exception) back."""
    try:
        reply: tuple[bool, Any] = (True, fn(*args, **kwargs))
    except BaseException as e:  # noqa: BLE001 - the caller raises it again
        reply = (False, e)
    try:
        send.send(reply)
    except Exception as e:  # noqa: BLE001 - a result or exception that does not pickle
        send.send((False, RuntimeError(f"{fn.__name__}: {reply[1]!r} could not be sent back: {e}")))
    send.close()


def measure_device() -> tuple[str, Ceilings]:
    device = torch.device("cuda")
    return device_name(device), measure_ceilings(device)


def kernel_parts(model_dir: str, parts: frozenset[str], ceil: Ceilings, decode_attention: str = "fa2"
                 ) -> dict[str, Any]:
    """Decode roofline and prefill tables, on one unified (whole-GPU) engine."""
    core = make_core(model_dir, "unified", decode_attention=decode_attention,
                     scheduler=SchedulerConfig(max_prefill_tokens=65536, max_decode_seqs=128))
    result: dict[str, Any] = {}
    if "decode" in parts:
        result["decode"] = [dict(r, decode_attention=decode_attention)
                            for r in bench_decode(core, ceil, DECODE_BATCHES, DECODE_CONTEXTS)]
    if "prefill" in parts:
        shapes = ((1, 512), (1, 2048), (1, 4096), (1, 8192), (4, 2048), (4, 4096), (8, 4096), (8, 8192))
        result["prefill"] = bench_prefill(core, ceil, shapes)
    core.shutdown()
    return result


def switch_part(model_dir: str) -> dict[str, Any]:
    core = make_core(model_dir, "semi-pd", scheduler=SchedulerConfig(max_decode_seqs=128))
    result = bench_switch_stall(core)
    core.shutdown()
    return result


def run_engine_bench(model_dir: str, parts: set[str], vllm_json: str | None = None,
                     checkpoint: Callable[[dict[str, Any]], None] = lambda r: None,
                     decode_attention: tuple[str, ...] = ("fa2",), command: str = "") -> dict[str, Any]:
    """Run the chosen parts, each in its own process; `checkpoint(result)` after each keeps what is done;
    `command`: the command line recorded in the result.

    The decode table and the unified offline job run once per `decode_attention` kernel; the other parts with
    the first."""
    device, ceil = in_fresh_process(measure_device)
    result: dict[str, Any] = dict(device=device, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                  commit=git_commit(), command=command,
                                  model=json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0])
    result["ceilings"] = dict(copy_TBps=ceil.copy_bytes_per_s / 1e12, matmul_TFLOPs=ceil.matmul_flops_per_s / 1e12)
    if parts & {"decode", "prefill"}:
        result.update(in_fresh_process(kernel_parts, model_dir, frozenset(parts), ceil, decode_attention[0]))
        checkpoint(result)
    for kernel in decode_attention[1:] if "decode" in parts else ():
        result["decode"] += in_fresh_process(kernel_parts, model_dir, frozenset({"decode"}), ceil, kernel)["decode"]
        checkpoint(result)
    if "decode-loop" in parts:
        result["decode_loop"] = []
        for mode in ("unified", "semi-pd"):
            for overlap in (False, True):
                result["decode_loop"] += in_fresh_process(bench_decode_loop, model_dir, overlap, (1, 8, 32, 64, 128),
                                                          512, mode=mode)
                checkpoint(result)
    if "switch" in parts:
        result["switch"] = in_fresh_process(switch_part, model_dir)
        checkpoint(result)
    if "contention" in parts:
        result["contention"] = in_fresh_process(bench_contention, model_dir, (96,), 32, (15.0, 20.0), prompts=16)
        checkpoint(result)
    if "offline" in parts:
        result["offline"] = []
        for kernel in decode_attention:
            result["offline"] += in_fresh_process(bench_offline, model_dir, "unified", [None], decode_attention=kernel,
                                                  scheduler=SchedulerConfig(max_prefill_tokens=16384))
            checkpoint(result)
        result["offline"] += in_fresh_process(bench_offline, model_dir, "semi-pd", [80, 64], splits=(64, 80),
                                              decode_attention=decode_attention[0],
                                              scheduler=SchedulerConfig(max_prefill_tokens=8192))
    if vllm_json and Path(vllm_json).is_file():
        result["vllm"] = json.loads(Path(vllm_json).read_text())
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown tables of every figure in `result`."""
    lines = [f"# Engine benchmark: {result['model']} on {result['device']}", "",
             f"- date: {result['date']}", f"- commit: {result['commit']}", f"- command: `{result['command']}`",
             f"- measured ceilings: copy {result['ceilings']['copy_TBps']:.2f} TB/s (read+write), "
             f"bf16 matmul {result['ceilings']['matmul_TFLOPs']:.0f} TFLOP/s", ""]
    if "decode" in result:
        vllm_steps = {(r["batch"], r["context"]): r["step_ms"] for r in result.get("vllm", {}).get("decode", [])}
        lines += ["## Decode step (whole GPU, CUDA graphs, incl. sampling and host sync)", "",
                  "| decode attention | batch | context | step ms | roofline ms | ratio | tok/s | vLLM step ms "
                  "(its loop) | vLLM ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["decode"]:
            v = vllm_steps.get((r["batch"], r["context"]))
            theirs = "- | -" if v is None else f"{v:.2f} | {v / r['roofline_ms']:.2f}x"
            lines.append(f"| {r.get('decode_attention', 'fa2')} | {r['batch']} | {r['context']} | {r['step_ms']:.2f} | "
                         f"{r['roofline_ms']:.2f} | {r['ratio']:.2f}x | {r['tokens_per_s']:.0f} | {theirs} |")
        lines.append("")
    if "decode_loop" in result:
        vllm_steps = {(r["batch"], r["context"]): r["step_ms"] for r in result.get("vllm", {}).get("decode", [])}
        lines += ["## Decode step in the engine loop (unified: whole GPU; semi-pd: the decode worker, prefill on the "
                  "smallest split)", "",
                  "| mode | batch | context | mean context measured | decode SMs | one step at a time ms | overlapped ms "
                  "| vLLM step ms (its loop) |", "|---|---|---|---|---|---|---|---|"]
        overlapped = {(r.get("mode", "semi-pd"), r["batch"]): r["step_ms"] for r in result["decode_loop"] if r["overlap"]}
        for r in (r for r in result["decode_loop"] if not r["overlap"]):
            mode = r.get("mode", "semi-pd")
            o, v = overlapped.get((mode, r["batch"])), vllm_steps.get((r["batch"], r["context"]))
            lines.append(f"| {mode} | {r['batch']} | {r['context']} | {r.get('mean_context', r['context']):.0f} | "
                         f"{r['decode_sms']} | {r['step_ms']:.2f} | {'-' if o is None else f'{o:.2f}'} | "
                         f"{'-' if v is None else f'{v:.2f}'} |")
        lines.append("")
    if "prefill" in result:
        lines += ["## Prefill (whole GPU)", "",
                  "| requests | length | ms | of which host launch ms | tok/s | TFLOP/s | % of matmul peak |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['requests']} | {r['length']} | {r['ms']:.1f} | {r.get('launch_ms', float('nan')):.1f} | "
                  f"{r['tokens_per_s']:.0f} | {r['tflops']:.0f} | {r['pct_of_matmul_peak']:.0f}% |"
                  for r in result["prefill"]]
        lines.append("")
    if "switch" in result:
        lines += ["## SM split switch stall (semi-pd, 64 decoding requests, 2048-token prompts queued)", "",
                  "First visit: the split's first use since the engine's warm-up; revisit: its second. Extra: the first "
                  "iteration on the new split minus the worker's median iteration; slowest: the worker's slowest "
                  "iteration begun within 0.3 s of the switch (medians over switches).", "",
                  "| worker | switches adopted | adopt median us | adopt max us | extra ms, first visit | extra ms, "
                  "revisit | slowest ms, first visit | slowest ms, revisit |", "|---|---|---|---|---|---|---|---|"]
        for name, r in result["switch"].items():
            lines.append(f"| {name} | {r['adoptions']} | {r['adopt_us_median'] or 0:.1f} | {r['adopt_us_max'] or 0:.1f} | "
                         f"{r['first_iter_extra_ms']:.3f} | {r.get('revisit_first_iter_extra_ms', math.nan):.3f} | "
                         f"{r.get('slowest_after_ms', math.nan):.1f} | {r.get('revisit_slowest_after_ms', math.nan):.1f} |")
        lines.append("")
    if "contention" in result:
        lines += ["## Prefill beside decode (semi-pd; decode idle, back to back, or paced)", "",
                  "| decode | decode batch | prefill SMs | prefill tok/s | vs idle | decode step ms | SM clock MHz "
                  "(min) | power W |", "|---|---|---|---|---|---|---|---|"]
        idle = {r["prefill_sms"]: r["prefill_tokens_per_s"] for r in result["contention"] if r["decode_batch"] == 0}
        for r in result["contention"]:
            step = "-" if r["decode_step_ms"] is None else f"{r['decode_step_ms']:.2f}"
            clock = f"{r['sm_clock_mhz']:.0f} ({r['sm_clock_min_mhz']:.0f})" if "sm_clock_mhz" in r else "-"
            power = f"{r['power_w']:.0f}" if "power_w" in r else "-"
            lines.append(f"| {r['decode']} | {r['decode_batch']} | {r['prefill_sms']} | {r['prefill_tokens_per_s']:.0f} | "
                         f"{r['prefill_tokens_per_s'] / idle[r['prefill_sms']]:.2f}x | {step} | {clock} | {power} |")
        lines.append("")
    if "offline" in result or "vllm" in result:
        lines += ["## Offline job (256 requests, 128-1024 prompt tokens, 128 output tokens, ignore_eos)", "",
                  "| engine | mode | decode attention | prefill SMs | token budget | seconds | output tok/s | "
                  "total tok/s | SM clock near peak power, MHz |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result.get("offline", []):
            lines.append(f"| semipd | {r['mode']} | {r.get('decode_attention', 'fa2')} | {r['prefill_sms']} | "
                         f"{r.get('max_prefill_tokens', '')} | {r['seconds']:.2f} | "
                         f"{r['output_tokens_per_s']:.0f} | {r['total_tokens_per_s']:.0f} | {_peak_clock(r)} |")
        v = result.get("vllm")
        if v:
            lines.append(f"| vLLM {v.get('version', '')} | default | FA3 | - | default | {v['seconds']:.2f} | "
                         f"{v['output_tokens_per_s']:.0f} | {v['total_tokens_per_s']:.0f} | {_peak_clock(v)} |")
        lines.append("")
        phased = [r for r in result.get("offline", []) if "phases" in r]
        if phased:
            lines += ["Where each worker's time went (iterations with prefill chunks; decode-only steps):", "",
                      "| mode | decode attention | prefill SMs | worker | prefill iterations | their s | decode steps | "
                      "their s | median step ms |", "|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['mode']} | {r['decode_attention']} | {r['prefill_sms']} | {name} | "
                      f"{p['prefill_iterations']} | {p['prefill_s']:.2f} | "
                      f"{p['decode_steps']} | {p['decode_s']:.2f} | {p['decode_step_ms']:.2f} |"
                      for r in phased for name, p in r["phases"].items()]
            lines.append("")
    return "\n".join(lines)
