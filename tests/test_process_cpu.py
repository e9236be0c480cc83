"""The per-process CPU sampler of the serving benchmark (`cluster.bench.process_cpu`), on a /proc written here."""

from __future__ import annotations

from pathlib import Path

from cluster.bench.process_cpu import CpuTicks, cpu_seconds, format_summary, percents, read_ticks, summarize


def _process(proc: Path, pid: int, comm: str, cmdline: list[str], utime: int, stime: int) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    rest = ["S", "1", "1", "1", "0", "-1", "4194560", "100", "0", "0", "0", str(utime), str(stime), "0", "0"]
    (d / "stat").write_text(f"{pid} ({comm}) {' '.join(rest)}\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmdline) + (b"\0" if cmdline else b""))


def test_ticks_are_user_plus_system_time_named_by_pid_and_command_line(tmp_path: Path) -> None:
    _process(tmp_path, 41, "ray::ProxyActor", ["ray::ProxyActor"], 300, 20)
    _process(tmp_path, 42, "weird) name", ["python3", "-m", "cluster.cli", "bench", "serve"], 7, 3)
    _process(tmp_path, 2, "kthreadd", [], 0, 5)  # a kernel thread (no command line): left out
    (tmp_path / "self").mkdir()
    ticks = read_ticks(tmp_path)
    assert ticks == {41: CpuTicks("41 ray::ProxyActor", 320),
                     42: CpuTicks("42 python3 -m cluster.cli bench serve", 10)}


def test_percents_of_a_core_between_two_reads() -> None:
    before = {1: CpuTicks("1 ray::ProxyActor", 100), 2: CpuTicks("2 idle", 50), 3: CpuTicks("3 old", 900)}
    after = {1: CpuTicks("1 ray::ProxyActor.receive_asgi_messages", 190), 2: CpuTicks("2 idle", 50),
             3: CpuTicks("3 new", 40), 4: CpuTicks("4 started", 20)}
    # 100 ticks a second over 2 s: 90 ticks are 45% of a core, under the name the Ray worker had before its task
    # renamed it; pid 3 was taken again, so its new process counts from 0
    assert percents(before, after, 2.0, 100.0) == {"1 ray::ProxyActor": 45.0, "3 new": 20.0, "4 started": 10.0}


def test_the_summary_ranks_processes_by_their_mean_over_every_sample() -> None:
    text = "1.0 90.0 7 ray::ServeReplica\n1.0 40.0 8 ray::ProxyActor\n2.0 100.0 7 ray::ServeReplica\n" \
           "3.0 30.0 7 ray::ServeReplica\n3.0 80.0 8 ray::ProxyActor\n"
    rows = summarize(text, shown=1)
    assert rows == [("7 ray::ServeReplica", 220.0 / 3, 100.0)]
    assert summarize(text)[1] == ("8 ray::ProxyActor", 40.0, 80.0)  # absent from a sample: under 1% then
    assert format_summary(rows) == ("CPU of the busiest processes (% of a core, mean / highest): "
                                    "7 ray::ServeReplica 73 / 100")
    assert summarize("") == [] and format_summary([]) == ""


def test_cpu_seconds_sum_each_commands_samples_over_its_processes() -> None:
    text = "1.0 90.0 7 ray::ServeReplica\n1.0 40.0 8 ray::ProxyActor\n2.0 100.0 7 ray::ServeReplica\n" \
           "2.0 50.0 9 ray::ServeReplica\n"
    assert cpu_seconds(text) == {"ray::ServeReplica": 2.4, "ray::ProxyActor": 0.4}
    assert cpu_seconds(text, interval_s=0.5) == {"ray::ServeReplica": 1.2, "ray::ProxyActor": 0.2}
    assert cpu_seconds("") == {}
