"""Whether a kernel's first launch, under CUDA's lazy module loading, stalls another thread's CUDA calls.

    CUDA_MODULE_LOADING=LAZY python3 bench/lazy_load_probe.py [--busy-ms 300]
    CUDA_MODULE_LOADING=EAGER python3 bench/lazy_load_probe.py

Serving's run 32 (H100) logged decode stalls of 132-188 ms spent in host CUDA calls, in both workers at once,
while prefill chunks of 100-200 ms were queued. The suspicion: lazy loading (CUDA's default) loads a kernel at its
first launch holding the context's lock, after the GPU's queued work has drained, and every other thread's CUDA
call waits on the lock. This probe needs torch only. One stream is given about `--busy-ms` of matmuls; a second
thread launches a small kernel on another stream every millisecond and times each launch call; the main thread
then calls operators this process has not run before (their kernels' first launches). It prints the context's
start-up time and device memory in use, the host time of each first launch, and the other thread's longest launch
call and longest gap between launches while it ran (a launch blocked on the lock, or the interpreter held).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable

import torch

SIDE = 8192  # the busy stream's matmuls: [SIDE, SIDE] bf16


def first_uses(device: torch.device) -> dict[str, Callable[[], object]]:
    """Operators a fresh process has not run, each a precompiled kernel of its own source file, none synchronizing."""
    x = torch.rand(4096, device=device)
    edges = torch.linspace(0, 1, 17, device=device)
    image = torch.rand(1, 1, 64, 64, device=device)
    grid = torch.rand(1, 32, 32, 2, device=device) * 2 - 1
    return {"bucketize": lambda: torch.bucketize(x, edges),
            "grid_sample": lambda: torch.nn.functional.grid_sample(image, grid, align_corners=False)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy-ms", type=float, default=300.0, help="GPU work queued before each first launch")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("lazy_load_probe: needs a CUDA device")
    mode = os.environ.get("CUDA_MODULE_LOADING", "unset")
    device = torch.device("cuda")
    t0 = time.perf_counter()
    a = torch.randn(SIDE, SIDE, device=device, dtype=torch.bfloat16)
    torch.matmul(a, a)
    torch.cuda.synchronize()
    start_s = time.perf_counter() - t0
    free, total = torch.cuda.mem_get_info()
    busy, other = torch.cuda.Stream(), torch.cuda.Stream()
    tick = torch.zeros(1, device=device)
    ops = first_uses(device)  # their inputs made now: only the operators themselves come later
    with torch.cuda.stream(other):
        tick.add_(1)  # the other thread's kernel, loaded before the probe
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(busy):
        start.record()
        torch.matmul(a, a)
        end.record()
    end.synchronize()
    matmuls = max(1, round(args.busy_ms / start.elapsed_time(end)))

    calls: list[tuple[float, float]] = []  # (start, seconds) of the other thread's launch calls
    stop = threading.Event()

    def launch_every_ms() -> None:
        with torch.cuda.stream(other):
            while not stop.is_set():
                t = time.perf_counter()
                tick.add_(1)
                calls.append((t, time.perf_counter() - t))
                time.sleep(0.001)

    thread = threading.Thread(target=launch_every_ms, daemon=True)
    thread.start()
    rows = []
    for name, op in ops.items():
        time.sleep(0.05)
        with torch.cuda.stream(busy):
            for _ in range(matmuls):
                torch.matmul(a, a)
            t = time.perf_counter()
            op()
            first_s = time.perf_counter() - t
        busy.synchronize()
        starts = [at for at, _ in calls]
        worst = max((s for at, s in calls if t - 0.002 <= at <= t + first_s), default=0.0)
        gap = max((b - a_ for a_, b in zip(starts, starts[1:]) if b >= t and a_ <= t + first_s), default=0.0)
        rows.append((name, first_s, worst, gap))
    stop.set()
    thread.join()
    print(f"CUDA_MODULE_LOADING={mode}: context and first matmul {start_s:.2f} s, "
          f"{(total - free) / 2**30:.2f} GiB in use; {matmuls} matmuls queued (~{args.busy_ms:.0f} ms) before each")
    print("| first launch of | its host time (ms) | the other thread meanwhile: longest launch call (ms) "
          "| longest gap between its launches (ms) |")
    print("|---|---|---|---|")
    for name, first_s, worst, gap in rows:
        print(f"| {name} | {1e3 * first_s:.1f} | {1e3 * worst:.1f} | {1e3 * gap:.1f} |")


if __name__ == "__main__":
    main()
