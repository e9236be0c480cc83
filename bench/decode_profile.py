"""Where a decode step's time goes (GPU machine): host preparation, graph replay, logits + sampling,
and the kernels inside the replay, for a few batch sizes.

    python3 bench/decode_profile.py MODEL_DIR [BATCH ...]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cluster.bench.engine_bench import _decode_plan, _dummy_requests, _time_step, make_core


def _host_ms(fn, reps: int = 30) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def _gpu_ms(fn, stream: torch.cuda.Stream, reps: int = 30) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(model_dir: str, batches: list[int], ctx: int = 512) -> None:
    core = make_core(model_dir, "unified")
    runner = core.workers[-1].runner
    part = core.partitioner.partition_for("decode")
    runner.set_partition(part)
    stream = part.stream
    graphs = runner.graphs
    rows = []
    for bs in batches:
        plan, held = _decode_plan(core, bs, ctx)
        reqs = _dummy_requests(bs)
        step = _time_step(runner, plan, reqs, warmup=5, reps=30)[0] * 1e3
        bucket = graphs.bucket(bs)
        graph, out = graphs.graphs[(stream.cuda_stream, bucket)]
        with torch.cuda.stream(stream):
            prep = _host_ms(lambda: graphs._prepare(plan.decodes, bucket))
            replay = _gpu_ms(graph.replay, stream)
            hidden = out[:bs]
            sample = _gpu_ms(lambda: runner.sampler(runner.model.compute_logits(hidden), reqs), stream)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    runner.execute(plan, reqs)
                torch.cuda.synchronize()
        print(f"\n=== batch {bs} x ctx {ctx}: kernels over 5 steps ===")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
        rows.append((bs, step, prep, replay, sample))
        for blocks in held:
            core.allocator.free(blocks)
    print("\n| batch | step ms (wall) | prepare ms (host) | replay ms (GPU) | logits+sample ms | step - replay |")
    print("|---|---|---|---|---|---|")
    for bs, step, prep, replay, sample in rows:
        print(f"| {bs} | {step:.2f} | {prep:.2f} | {replay:.2f} | {sample:.2f} | {step - replay:.2f} |")
    core.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], [int(b) for b in sys.argv[2:]] or [1, 64])
