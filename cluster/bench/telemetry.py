"""GPU clock and power while a benchmark runs, sampled by `nvidia-smi` (no NVML binding needed).

`GpuTelemetry` samples in the background around a block of Python; `bench/gpu_serve_compare.sh` samples
each serving window into a file with `python3 -m cluster.bench.telemetry sample FILE` (killed afterwards) and
prints its summary with `python3 -m cluster.bench.telemetry summary FILE`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

PEAK_SHARE = 0.2  # near peak power: the samples within this share of the power range from the top
QUERY = ("--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits")


def sampler_command(interval_ms: int) -> list[str]:
    """The `nvidia-smi` command line that prints one `QUERY` line every `interval_ms`."""
    return ["nvidia-smi", *QUERY, "-lms", str(interval_ms)]


class GpuTelemetry:
    """SM clock (MHz) and power (W) every `interval_ms` while the `with` block runs; `summary()` after it
    ({} without nvidia-smi, e.g. off a GPU)."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> GpuTelemetry:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(sampler_command(self.interval_ms), stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        self.samples = parse_telemetry(out)

    def summary(self) -> dict[str, float]:
        return summarize(self.samples)


def parse_telemetry(text: str) -> list[tuple[float, float]]:
    """(SM clock MHz, power W) from the lines `nvidia-smi` prints for `QUERY`; other lines are skipped."""
    samples = []
    for line in text.splitlines():
        try:
            clock, watts = (float(f) for f in line.split(","))
        except ValueError:
            continue
        samples.append((clock, watts))
    return samples


def summarize(samples: list[tuple[float, float]]) -> dict[str, float]:
    """Mean and lowest SM clock, mean and highest power ({} without samples), and the mean clock and power of
    the samples near peak power: within the top `PEAK_SHARE` of the span from the lowest power to the highest.

    A serving window's samples start before its first request and end after its last, so their means mix idle
    and the drain with the load (H200, 2026-12-03: 435 W mean in a window that ran at the 700 W cap while its
    requests arrived); the samples near peak are the time at full load, and their clock what it ran at.
    """
    if not samples:
        return {}
    clocks, watts = zip(*samples)
    highest = max(watts)
    threshold = highest - PEAK_SHARE * (highest - min(watts))
    peak = [(c, w) for c, w in samples if w >= threshold]
    return dict(sm_clock_mhz=statistics.fmean(clocks), sm_clock_min_mhz=min(clocks),
                power_w=statistics.fmean(watts), power_max_w=highest,
                peak_samples=float(len(peak)), peak_power_threshold_w=threshold,
                peak_sm_clock_mhz=statistics.fmean(c for c, _ in peak),
                peak_power_w=statistics.fmean(w for _, w in peak))


def format_summary(summary: dict[str, float]) -> str:
    """One line ('' without samples)."""
    if not summary:
        return ""
    return (f"GPU during the run: SM clock {summary['sm_clock_mhz']:.0f} MHz mean, {summary['sm_clock_min_mhz']:.0f} "
            f"min; power {summary['power_w']:.0f} W mean, {summary['power_max_w']:.0f} max; near peak power "
            f"({summary['peak_samples']:.0f} samples at {summary['peak_power_threshold_w']:.0f} W or more): "
            f"SM clock {summary['peak_sm_clock_mhz']:.0f} MHz, power {summary['peak_power_w']:.0f} W")


def main(argv: list[str]) -> int:
    """`sample FILE [INTERVAL_MS]`: become `nvidia-smi` printing samples into FILE (every 250 ms) until killed
    (nothing without nvidia-smi); `summary FILE`: the summary line of such a file ('' without samples)."""
    usage = "usage: python3 -m cluster.bench.telemetry {sample FILE [INTERVAL_MS] | summary FILE}"
    if len(argv) < 2 or argv[0] not in ("sample", "summary"):
        print(usage, file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "summary":
        print(format_summary(summarize(parse_telemetry(path.read_text() if path.is_file() else ""))))
        return 0
    if shutil.which("nvidia-smi"):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        command = sampler_command(int(argv[2]) if len(argv) > 2 else 250)
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
