"""Whether decode stands still on a fresh semi-PD engine's first load: with and without the warm-up's draws, and
with CUDA's lazy or eager module loading.

    python3 bench/stall_probe.py MODEL_DIR [--loading lazy,eager] [--draws no,yes] [--prompts offline|documents]
                                           [--waves 8] [--gap-s 0.25] [--requests N] [--trace]

On the H100 (serving's run 30) a fresh server's first windows at a new load had decode stand still for 100-280 ms
at a time while prefill iterations spent 3-16 ms in their draws (0.2 once warm); 6426c4e added draws of every row
count to the warm-up, which took the probe's stalls from 21 to 2 (run 31). Run 32 logged where the rest sit:
documents' stalls of 132-188 ms were host time in CUDA calls of both workers at once, in the first windows and
after switches to a split not used before. That is what a kernel's first launch under lazy module loading (CUDA's
default) does: it loads the kernel holding the context's lock, after the GPU's queued work has drained, and every
other thread's CUDA call waits. `CUDA_MODULE_LOADING=EAGER` loads every kernel at start instead.

Each arm builds an engine in a fresh process (a process loads a kernel once; the loading mode is set in its
environment), and sends the prompts in waves so that prefill runs beside a growing decode batch: the offline job's
(128-1,024 tokens) or documents' (3,000-6,000 tokens, 180 out, chunks of the full prefill budget over long
prefixes). It prints the engine's start-up time, its KV pages and the device memory left free, the job's time from
the first wave to the last request's end, prefill's tokens per second of its iterations, decode's iterations over
100 ms, its longest, the decode stall time the engine counted, and the host time of prefill's draws.

Run 33 (H100) took both suspects off the list: with EAGER the stalls stayed (offline prompts without the draws:
26 over 100 ms; a serving window at 5.5 documents a second: as many as with LAZY), and no thread held the
interpreter lock for 30 ms (`actors.engine.pauses`). They sit inside CUDA calls. `--trace` records each arm under
torch's profiler (CUDA runtime and driver calls, kernels, torch ops) and prints the longest CUDA calls: which
worker made each, the torch op it was in, what the other worker's calls were meanwhile, and the kernels then
running. `--stacks` samples both workers' Python stacks every 5 ms and prints the commonest inside decode's
iterations over 100 ms.

Run 34 (H200) found them: the long calls were cudaMemsetAsync and cudaMemcpyAsync (inside GEMMs: decode's LM head
in its draw, prefill's linear layers) that waited 100-165 ms while the prefill stream's queued kernels ran, the
other worker making no CUDA call meanwhile; `CUDA_SCALE_LAUNCH_QUEUES=4x` changed nothing; prefill one iteration
at a time (`--prefill-overlap no`) took the offline arm from 14 decode steps over 100 ms to 1, the documents arm
from 2 to 0. The overlapped prefill queued a whole iteration (hundreds of kernels) behind the running one and
filled CUDA's launch queue; it now queues an iteration's kernels only once the one before has ended.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

from cluster.bench.engine_bench import in_fresh_process
from cluster.bench.kernel_time import LONG_CALL_MS, chrome_trace_events, long_calls
from cluster.bench.offline_job import JOB, OfflineJob, offline_prompts
from cluster.bench.stacks import StackSampler, stacks_in

LOADING_ENV = "CUDA_MODULE_LOADING"
DOCUMENTS = OfflineJob(num_requests=48, min_prompt=3000, max_prompt=6000, output_tokens=180)
WORKLOADS = {"offline": JOB, "documents": DOCUMENTS}


@contextmanager
def traced(enabled: bool, threads: Mapping[int, str], out: list[str]) -> Iterator[None]:
    """Record the body under torch's profiler if `enabled` and put its longest CUDA calls (`long_calls`) in `out`."""
    if not enabled:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        out.extend(long_calls(chrome_trace_events(path), threads))


def run_arm(model_dir: str, draws: bool, job: OfflineJob, waves: int, gap_s: float, trace: bool = False,
            stacks: bool = False, prefill_overlap: bool = True) -> dict[str, Any]:
    """One fresh engine's first load of `job`'s prompts; `draws` False leaves the warm-up's draws out;
    `prefill_overlap` False has prefill take each iteration's first tokens before it plans the next; `trace`:
    under torch's profiler, the longest CUDA calls in the row's "long_calls"; `stacks`: the workers' Python stacks
    during decode's iterations over 100 ms in its "stall_stacks"."""
    import torch

    from actors.engine.frontend import LLM
    from actors.request import SamplingParams
    from actors.runner.model_runner import ModelRunner

    if not draws:
        ModelRunner.warm_up_draws = lambda self, greedy_rows, sampled_rows: None  # type: ignore[method-assign]
    t0 = time.perf_counter()
    llm = LLM(model_dir, mode="semi-pd", load_format="dummy", overlap_prefill=prefill_overlap)
    start_s = time.perf_counter() - t0
    free_gib = torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else 0.0
    prompts = offline_prompts(llm.core.arch.vocab_size, job)
    params = SamplingParams(max_tokens=job.output_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    size = -(-len(prompts) // waves)
    failed: list[BaseException] = []

    def send(wave: list[list[int]]) -> None:
        try:
            llm.generate(wave, params)
        except BaseException as e:  # a refused wave (prompts past the model's length) fails the arm
            failed.append(e)

    senders = [threading.Thread(target=send, args=(prompts[i:i + size],)) for i in range(0, len(prompts), size)]
    prefill = next(w for w in llm.core.workers if w.name == "prefill")
    decode_worker = next(w for w in llm.core.workers if w.name == "decode")
    since, drawn_s, iterations = time.monotonic(), prefill.runner.host_seconds["sample"], prefill.iterations
    stalled_s = decode_worker.stalled_seconds
    workers = [w for w in llm.core.workers if w.thread is not None and w.thread.ident is not None]
    # the profiler names a thread by its pthread id's low 32 bits
    threads = {w.thread.ident & 0xFFFFFFFF: w.name for w in workers}  # type: ignore[union-attr]
    calls: list[str] = []
    sampler = StackSampler({w.thread.ident: w.name for w in workers}) if stacks else None  # type: ignore[misc]
    with traced(trace, threads, calls), (sampler or nullcontext()):
        for sender in senders:  # waves of arrivals: each wave's prompts prefill beside the earlier ones' decodes
            sender.start()
            time.sleep(gap_s)
        for sender in senders:
            sender.join()
    job_s = time.monotonic() - since
    if failed:
        llm.shutdown()
        raise RuntimeError(f"{len(failed)} of {len(senders)} waves failed: {failed[0]}") from failed[0]
    decode_its = [it for it in list(decode_worker.iteration_log) if it.start >= since]
    decode = [it.seconds for it in decode_its]
    prefills = [it for it in list(prefill.iteration_log) if it.start >= since]
    stalls = [(it.start, it.start + it.seconds) for it in decode_its if it.seconds > 0.1]
    row = dict(loading=os.environ.get(LOADING_ENV, "default"), draws=draws, overlap=prefill_overlap, start_s=start_s,
               kv_pages=llm.core.pool.num_pages, free_gib=free_gib, job_s=job_s,
               prefill_tok_s=sum(it.tokens for it in prefills) / max(1e-9, sum(it.seconds for it in prefills)),
               decode_steps=len(decode),
               over_100ms=len(stalls), longest_ms=1e3 * max(decode, default=0.0),
               stalled_s=decode_worker.stalled_seconds - stalled_s,
               prefill_draw_ms=1e3 * (prefill.runner.host_seconds["sample"] - drawn_s)
               / max(1, prefill.iterations - iterations), long_calls=calls,
               stall_stacks=stacks_in(sampler.samples, sampler.late, stalls) if sampler else [])
    llm.shutdown()
    return row


def choices(allowed: tuple[str, ...]) -> Any:
    """An argparse type: a comma-separated list of `allowed` values."""
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed)}, got {text!r}")
        return values
    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--loading", type=choices(("lazy", "eager")), default=["lazy"],
                        help="CUDA module loading of the arms' processes, e.g. lazy,eager (default lazy)")
    parser.add_argument("--draws", type=choices(("no", "yes")), default=["no", "yes"],
                        help="arms without and/or with the warm-up's draws (default no,yes)")
    parser.add_argument("--prefill-overlap", type=choices(("yes", "no")), default=["yes"],
                        help="arms whose prefill plans its next iteration while the current one runs (yes), "
                             "and/or one iteration at a time (no) (default yes)")
    parser.add_argument("--prompts", choices=sorted(WORKLOADS), default="offline",
                        help="the offline job's prompts or documents' (default offline)")
    parser.add_argument("--waves", type=int, default=8, help="waves the prompts arrive in (default 8)")
    parser.add_argument("--gap-s", type=float, default=0.25, help="seconds between waves (default 0.25)")
    parser.add_argument("--requests", type=int, default=None,
                        help="the workload's first N prompts (default all: 256 offline, 48 documents)")
    parser.add_argument("--trace", action="store_true",
                        help="record each arm under torch's profiler and print its CUDA calls of "
                             f"{LONG_CALL_MS:.0f} ms or more")
    parser.add_argument("--stacks", action="store_true",
                        help="sample the workers' Python stacks every 5 ms and print the commonest during decode's "
                             "iterations over 100 ms")
    args = parser.parse_args(argv)
    job = WORKLOADS[args.prompts]
    if args.requests is not None:
        job = OfflineJob(args.requests, job.min_prompt, job.max_prompt, job.output_tokens, job.seed)
    rows = []
    for loading in args.loading:
        os.environ[LOADING_ENV] = loading.upper()  # a spawned process starts with this environment
        rows += [in_fresh_process(run_arm, args.model_dir, draws == "yes", job, args.waves, args.gap_s, args.trace,
                                  args.stacks, overlap == "yes", timeout=600)
                 for draws in args.draws for overlap in args.prefill_overlap]
    print(f"{args.prompts}: {job.num_requests} prompts of {job.min_prompt}-{job.max_prompt} tokens, "
          f"{job.output_tokens} out, in {args.waves} waves")
    print("| module loading | warm-up draws | prefill overlap | engine start (s) | KV pages | free GiB | job (s) "
          "| prefill tok/s | decode steps | over 100 ms | longest (ms) | decode stalled (s) "
          "| prefill draw host (ms/iter) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loading'].lower()} | {'yes' if r['draws'] else 'no'} | {'yes' if r['overlap'] else 'no'} "
              f"| {r['start_s']:.1f} | {r['kv_pages']} | {r['free_gib']:.1f} | {r['job_s']:.2f} "
              f"| {r['prefill_tok_s']:,.0f} | {r['decode_steps']} | {r['over_100ms']} | {r['longest_ms']:.0f} | "
              f"{r['stalled_s']:.2f} | {r['prefill_draw_ms']:.2f} |")
    for r in rows:
        arm = (f"{r['loading'].lower()} loading, draws {'yes' if r['draws'] else 'no'}, "
               f"prefill overlap {'yes' if r['overlap'] else 'no'}")
        if args.trace:
            print(f"longest CUDA calls, {arm}:")
            print("\n".join(f"  {line}" for line in r["long_calls"]))
        if args.stacks:
            print(f"the workers' stacks during decode's iterations over 100 ms, {arm}:")
            print("\n".join(f"  {line}" for line in r["stall_stacks"]))


if __name__ == "__main__":
    main()
