"""Ending the local Ray instance `semipd serve` started when Ray's GCS no longer answers.

A SIGTERM to the whole process group (docker stop, systemd, Kubernetes) ends the GCS and raylet that `ray.init`
started in it. A call that needs the GCS then blocks inside Ray, where no signal reaches it, until Ray's core
worker ends the process a minute later. `RayCalls` runs the shutdown's Ray calls while the GCS answers;
`end_local_ray` ends the instance without it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

GCS_PROBE_TIMEOUT_S = 2.0  # a GCS that does not answer a KV read within this missed the probe
GCS_PROBE_INTERVAL_S = 1.0  # how often a shutdown step's GCS is asked while the step runs
GCS_LOST_AFTER_MISSES = 3  # probes in a row unanswered before the GCS is taken for gone (a busy one misses one)
RAY_WORKER_EXIT_TIMEOUT_S = 5.0  # Ray's worker processes end themselves once their raylet is gone; else killed


def gcs_answers(timeout_s: float = GCS_PROBE_TIMEOUT_S) -> bool:
    """Whether this process's Ray GCS answers a KV read within `timeout_s` (False: not connected to Ray).

    It asks the server: the GCS that a local `ray.init` started in this process's group ends with a signal to
    the group, and until this process reaps it, Ray's process bookkeeping sees it alive."""
    from ray._private import worker

    try:
        worker.global_worker.gcs_client.internal_kv_get(b"semipd-gcs-probe", namespace=b"semipd",
                                                        timeout=timeout_s)
    except Exception:
        return False
    return True


class RayCalls:
    """The shutdown's calls into Ray, each in a thread of its own, waited for only while Ray's GCS answers.

    A call that needs a GCS which is gone (`ray.get_actor`, `ray.kill`, `serve.shutdown`) blocks inside Ray, where
    no signal reaches it, until Ray's core worker ends the whole process a minute later (exit 1, nothing stopped).
    Once `GCS_LOST_AFTER_MISSES` probes (`answers`) in a row fail, the GCS is `lost`: the call is left behind
    (`blocked`) and later ones are skipped, each with a line saying so.
    """

    def __init__(self, answers: Callable[[], bool] = gcs_answers) -> None:
        self.answers = answers
        self.lost = False
        self._threads: list[threading.Thread] = []

    @property
    def blocked(self) -> bool:
        """Whether a call is still running in Ray (left behind when the GCS was lost, or by a signal)."""
        return any(t.is_alive() for t in self._threads)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run `fn(*args, **kwargs)`; return once it ends (raising what it raised) or the GCS is lost. A signal
        while it runs is raised here, and `fn` goes on in its thread (`settle` waits for it)."""
        if not self._check():
            print(f"{what}: skipped", file=sys.stderr, flush=True)
            return
        failed: list[BaseException] = []

        def target() -> None:
            try:
                fn(*args, **kwargs)
            except BaseException as e:  # raised in the caller's thread
                failed.append(e)

        thread = threading.Thread(target=target, name=f"semipd {what}", daemon=True)
        self._threads.append(thread)
        thread.start()
        self._wait()
        if thread.is_alive():
            print(f"{what}: left blocked in Ray", file=sys.stderr, flush=True)
        elif failed:
            raise failed[0]

    def settle(self) -> None:
        """Wait for the calls a signal left running, while the GCS answers."""
        self._wait()

    def _wait(self) -> None:
        while self.blocked and not self.lost:
            for t in self._threads:
                t.join(GCS_PROBE_INTERVAL_S)
            if self.blocked:
                self._check()

    def _check(self) -> bool:
        """Whether the GCS still answers, asked up to `GCS_LOST_AFTER_MISSES` times; the first time it does not,
        say so (`lost` from then on)."""
        if not self.lost and not any(self.answers() for _ in range(GCS_LOST_AFTER_MISSES)):
            self.lost = True
            print("Ray's GCS does not answer (did the signal stop Ray too?): the shutdown steps that need it are "
                  "skipped", file=sys.stderr, flush=True)
        return not self.lost


def stop_ray(calls: RayCalls) -> None:
    """`ray.shutdown` (which ends the Ray instance this process started), once the calls a signal left running
    ended; not once the GCS is lost: it would wait for it."""
    import ray

    calls.settle()
    if not calls.lost:
        ray.shutdown()


def end_local_ray() -> None:
    """End the Ray instance this process started without its GCS: the processes `ray.init` started (GCS, raylet,
    ...: killed, and reaped), then the worker processes of its raylet (actors, Serve's proxy and replicas; in
    process groups of their own, they end once their raylet is gone, or are killed after
    RAY_WORKER_EXIT_TIMEOUT_S)."""
    from ray._private import worker

    node = worker._global_node
    if node is None:
        return
    raylets = [p.process.pid for p in node.all_processes.get("raylet", [])]
    node.kill_all_processes(check_alive=False, allow_graceful=False)  # a GCS that does not answer
    workers = [pid for raylet in raylets for pid in _workers_of(raylet)]
    deadline = time.monotonic() + RAY_WORKER_EXIT_TIMEOUT_S
    while (left := [pid for pid in workers if process_running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        log.warning("Ray worker process %d did not end with its raylet: killed", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _workers_of(raylet_pid: int) -> list[int]:
    """The processes a raylet started (Ray sets RAY_RAYLET_PID in their environment); none without /proc."""
    marker = f"RAY_RAYLET_PID={raylet_pid}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:  # ended, or another user's
            pass
    return found


def process_running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
