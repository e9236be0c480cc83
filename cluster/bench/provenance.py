"""Where a benchmark's figures came from: the commit measured, recorded beside the device, date and command in
every result a benchmark writes (docs/perf/ keeps them)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """The commit benchmarked: $SEMIPD_COMMIT (set where the tree travels without .git), else the HEAD of the
    checkout this package runs from (not of the working directory), else "unknown"."""
    if os.environ.get("SEMIPD_COMMIT"):
        return os.environ["SEMIPD_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
