"""The CPU each process on the host takes while a benchmark window runs, read from /proc (Linux).

A server's Python processes (Serve's HTTP proxy, its ingress replica, the engine actor) each run one interpreter: one
near 100% of a core has no time to spare, and the streams it carries wait for it (tokens reach the client late, in
bunches). `bench/gpu_serve_compare.sh` samples each serving window into a file with
`python3 -m cluster.bench.process_cpu sample FILE` (killed afterwards) and prints the busiest processes with
`python3 -m cluster.bench.process_cpu summary FILE`.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

NAME_CHARS = 60  # of a process's command line
SHOWN = 5  # processes in a summary line
MIN_PERCENT = 1.0  # a process under this in a sample is not written


class CpuTicks(NamedTuple):
    name: str  # "<pid> <command line>"
    ticks: int  # user and system time so far, in clock ticks


def read_ticks(proc: Path = Path("/proc")) -> dict[int, CpuTicks]:
    """Every process's CPU time so far, by pid (kernel threads, and processes that end while read, are left out)."""
    out = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        command = " ".join(cmdline.replace(b"\0", b" ").decode(errors="replace").split())
        if not command:  # a kernel thread
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from the state (stat's field 3) on: utime is 14, stime 15
        pid = int(entry.name)
        out[pid] = CpuTicks(f"{pid} {command}"[:NAME_CHARS], int(fields[11]) + int(fields[12]))
    return out


def percents(before: dict[int, CpuTicks], after: dict[int, CpuTicks], seconds: float, ticks_per_s: float
             ) -> dict[str, float]:
    """CPU % of one core each process took between two `read_ticks` `seconds` apart (those at `MIN_PERCENT` or
    more), by its name in `before`: a Ray worker's title names the task it runs now. A process that started in
    between (a pid new, or taken again: fewer ticks than before) counts from 0 under its own name."""
    out = {}
    for pid, now in after.items():
        then = before.get(pid)
        if not _same_process(now, then):
            then = CpuTicks(now.name, 0)
        percent = 100.0 * (now.ticks - then.ticks) / ticks_per_s / seconds
        if percent >= MIN_PERCENT:
            out[then.name] = percent
    return out


def sample(path: Path, interval_s: float = 1.0, proc: Path = Path("/proc")) -> None:
    """Append `elapsed-s percent name` lines to `path`, one per busy process each `interval_s`, until killed."""
    ticks_per_s = float(os.sysconf("SC_CLK_TCK"))
    start = last_t = time.monotonic()
    last = read_ticks(proc)
    with path.open("w") as f:
        while True:
            time.sleep(interval_s)
            now_t, now = time.monotonic(), read_ticks(proc)
            for name, percent in percents(last, now, now_t - last_t, ticks_per_s).items():
                f.write(f"{now_t - start:.1f} {percent:.1f} {name}\n")
            f.flush()
            # a process keeps the name it had first (a Ray worker's title changes with its task)
            last_t, last = now_t, {pid: t._replace(name=last[pid].name) if _same_process(t, last.get(pid)) else t
                                   for pid, t in now.items()}


def _same_process(now: CpuTicks, then: CpuTicks | None) -> bool:
    """Whether `then`, an earlier read of `now`'s pid, was the same process: none if the pid is new, another if it
    was taken again (fewer ticks than before)."""
    return then is not None and now.ticks >= then.ticks


def _samples(text: str) -> tuple[set[float], dict[str, list[float]]]:
    """The sample times of a `sample` file, and each process's percents in them by its name ("<pid> <command>")."""
    by_name: dict[str, list[float]] = defaultdict(list)
    times = set()
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 3:
            continue
        try:
            t, percent = float(parts[0]), float(parts[1])
        except ValueError:
            continue
        times.add(t)
        by_name[parts[2]].append(percent)
    return times, by_name


def summarize(text: str, shown: int = SHOWN) -> list[tuple[str, float, float]]:
    """(name, mean %, highest %) of the `shown` processes with the highest mean over the samples of a `sample`
    file; a process missing from a sample took under `MIN_PERCENT` then."""
    times, by_name = _samples(text)
    if not times:
        return []
    rows = [(name, sum(p) / len(times), max(p)) for name, p in by_name.items()]
    return sorted(rows, key=lambda r: -r[1])[:shown]


def cpu_seconds(text: str, interval_s: float = 1.0) -> dict[str, float]:
    """The CPU seconds each command took over a `sample` file taken every `interval_s` (the processes of one
    command, pid left out, summed)."""
    out: dict[str, float] = defaultdict(float)
    for name, percents_of_core in _samples(text)[1].items():
        out[name.split(" ", 1)[-1]] += sum(percents_of_core) * interval_s / 100
    return dict(out)


def format_summary(rows: list[tuple[str, float, float]]) -> str:
    """One line ('' without samples)."""
    if not rows:
        return ""
    return "CPU of the busiest processes (% of a core, mean / highest): " + "; ".join(
        f"{name} {mean:.0f} / {top:.0f}" for name, mean, top in rows)


def main(argv: list[str]) -> int:
    """`sample FILE`: sample every second into FILE until killed; `summary FILE`: the summary line of such a file."""
    if len(argv) != 2 or argv[0] not in ("sample", "summary"):
        print("usage: python3 -m cluster.bench.process_cpu {sample | summary} FILE", file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "summary":
        print(format_summary(summarize(path.read_text() if path.is_file() else "")))
        return 0
    if Path("/proc/self/stat").is_file():
        sample(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
