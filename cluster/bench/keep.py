"""What of a GPU call's benchmark results goes into `docs/perf/` (`semipd bench keep`).

`bench/gpu_serve_compare.sh` brings back everything in one `compare.tgz`: each window's result JSON with a record
per request, each server's whole log, the GPU's clock and power samples. The repository keeps each result without
its per-request records (`load_result` then reads its saved aggregates), the timelines and decisions as they are,
each server's stall and pause lines instead of its log, and no path of the machine anything ran on.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.bench.result import SCHEMA

RESULT_SCHEMA_PREFIX = SCHEMA.rsplit("/", 1)[0] + "/"  # any version of `bench serve`'s result
# an absolute path on a lent machine (or a checkout's); kept as its last component, e.g. a model's folder name
MACHINE_PATH = re.compile(r"/(?:tmp|opt|work|root|home|mnt|var)(?:/[\w.+-]+)+/?")
STALL_KINDS = ("decode stalled", "prefill stalled", "paused")
STALL_LINE = re.compile(f" ({'|'.join(STALL_KINDS)}): ")
# Ray's worker prefix (colour codes, "(EngineActor pid=...)") before a log record's date
LOG_RECORD_START = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} ")
# the clock and power samples (each result's log line summarises them), the CPU samples (its .log file does)
LEFT_OUT_SUFFIXES = (".gpu.csv", ".cpu.txt")
SERVER_LOG_SUFFIX = "-server.log"


class KeepError(ValueError):
    """The results to keep cannot be read."""


@dataclass
class Kept:
    """What `keep_results` wrote, by kind (paths relative to its destination)."""

    results: list[str] = field(default_factory=list)  # result JSONs, without their records
    stall_files: list[str] = field(default_factory=list)  # one per server log
    copied: list[str] = field(default_factory=list)  # the rest, paths made machine-free
    left_out: list[str] = field(default_factory=list)  # sources not kept
    stall_counts: Counter[str] = field(default_factory=Counter)  # "decode stalled", "prefill stalled", "paused"

    def summary(self) -> str:
        counts = ", ".join(f"{self.stall_counts[kind]} {kind}" for kind in STALL_KINDS)
        return (f"{len(self.results)} results without their records, {len(self.stall_files)} servers' stall "
                f"lines ({counts}), {len(self.copied)} other files; left out: {', '.join(self.left_out) or 'nothing'}")


def keep_results(source: Path, dest: Path) -> Kept:
    """Write what the repository keeps of `source` (a results folder, or a .tgz of one) into `dest`."""
    kept = Kept()
    for name, data in _source_files(source):
        if name.endswith(LEFT_OUT_SUFFIXES):
            kept.left_out.append(name)
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(SERVER_LOG_SUFFIX):
            stalls = target.with_name(target.name.removesuffix(SERVER_LOG_SUFFIX) + "-stalls.txt")
            lines = list(stall_lines(_text(name, data)))
            stalls.write_text("".join(line + "\n" for _, line in lines))
            kept.stall_counts.update(kind for kind, _ in lines)
            kept.stall_files.append(stalls.relative_to(dest).as_posix())
        elif name.endswith(".json"):
            try:
                value = json.loads(_text(name, data))
            except json.JSONDecodeError as e:
                raise KeepError(f"{name}: not JSON ({e})") from None
            is_result = isinstance(value, dict) and str(value.get("schema", "")).startswith(RESULT_SCHEMA_PREFIX)
            if is_result:
                value.pop("requests", None)
            target.write_text(json.dumps(_machine_free(value), indent=1) + "\n")
            (kept.results if is_result else kept.copied).append(name)
        else:
            target.write_text(machine_free(_text(name, data)))
            kept.copied.append(name)
    return kept


def _source_files(source: Path) -> Iterator[tuple[str, bytes]]:
    """(relative name, contents) of every regular file in `source`, a folder or a tar archive, sorted by name."""
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            yield path.relative_to(source).as_posix(), path.read_bytes()
        return
    if not source.is_file():
        raise KeepError(f"{source}: no such folder or file")
    try:
        with tarfile.open(source) as tar:
            for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
                name = Path(member.name).as_posix().removeprefix("./")
                if name.startswith("/") or ".." in Path(name).parts:
                    raise KeepError(f"{source}: {member.name!r} points outside the results")
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file's
                yield name, handle.read()
    except (tarfile.TarError, OSError) as e:
        raise KeepError(f"{source}: not a readable tar archive ({e})") from None


def stall_lines(log: str) -> Iterator[tuple[str, str]]:
    """(kind, line) of the workers' stall lines and the pause watch's lines of a server log, each line from its
    date on; kind is one of `STALL_KINDS`."""
    for line in log.splitlines():
        stall = STALL_LINE.search(line)
        if stall:
            start = LOG_RECORD_START.search(line)
            yield stall.group(1), machine_free(line[start.start():] if start else line)


def machine_free(text: str) -> str:
    """`text` with every absolute path of the machine cut to its last component."""
    return MACHINE_PATH.sub(lambda m: m.group().rstrip("/").rsplit("/", 1)[-1], text)


def _machine_free(value: Any) -> Any:
    if isinstance(value, str):
        return machine_free(value)
    if isinstance(value, list):
        return [_machine_free(v) for v in value]
    if isinstance(value, dict):
        return {k: _machine_free(v) for k, v in value.items()}
    return value


def _text(name: str, data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise KeepError(f"{name}: not text; move it out of the results or name it in LEFT_OUT_SUFFIXES") from None
