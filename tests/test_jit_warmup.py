"""Building flashinfer's kernels side by side at engine start (`actors.runner.jit_warmup`): the thread pool's
contract on CPU; the kernels themselves are built in tests/test_gpu.py."""

from __future__ import annotations

import threading

import pytest

from actors.runner.jit_warmup import run_in_parallel


def test_tasks_run_at_the_same_time() -> None:
    """Each task waits at a barrier that opens only when all of them have reached it: run one after the other,
    the first would time out."""
    barrier = threading.Barrier(5, timeout=30)
    threads: set[str] = set()

    def task() -> None:
        threads.add(threading.current_thread().name)
        barrier.wait()

    seconds = run_in_parallel([task] * 5)
    assert len(seconds) == 5 and all(s >= 0 for s in seconds)
    assert len(threads) == 5 and threading.current_thread().name not in threads


def test_a_failing_task_fails_the_call_after_the_others_end() -> None:
    ended = threading.Event()

    def fails() -> None:
        raise RuntimeError("nvcc failed")

    with pytest.raises(RuntimeError, match="nvcc failed"):
        run_in_parallel([fails, ended.set])
    assert ended.is_set()


def test_no_tasks() -> None:
    assert run_in_parallel([]) == []
