"""Start and stop a private `redis-server` process (for `semipd serve` and for tests).

`RedisServerProcess(port=None).start()` runs redis-server on loopback (a free port when
none is given), with persistence off, and waits until it answers PING. `stop()` ends
it; `start()` again brings it back on the same port (tests use this to simulate an
outage). Nothing happens at import time.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """redis-server is missing or did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ping(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a Redis server answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _stop_with_owner() -> None:
    """In the child, before exec (Linux): SIGTERM once the thread that started it ends, however its process
    ends. Ray's core worker ends a process at once when the Ray GCS is gone (a signal to the whole process group
    stops it too): no `finally` runs, and the server, in a session of its own, outlived `semipd serve`."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class RedisServerProcess:
    """One redis-server child process on `host:port` (no persistence). On Linux it stops when the thread that
    started it ends: start it from one that lives as long as the server should (the main thread)."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", workdir: str | Path | None = None,
                 executable: str | None = None) -> None:
        exe = executable or shutil.which("redis-server")
        if exe is None:
            raise RedisServerError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.exe = exe
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="semipd-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> RedisServerProcess:
        """Start the server and wait until it answers PING; returns self. A server that does not come up (or a
        Ctrl-C while it starts) is stopped before this raises."""
        if self.running:
            return self
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches the owner, which drains before stopping it
            preexec_fn=_stop_with_owner if sys.platform == "linux" else None,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RedisServerError(
                        f"redis-server exited with code {self.proc.returncode} (port {self.port} taken?)")
                if ping(self.host, self.port):
                    log.info("redis-server listening on %s", self.url)
                    return self
                time.sleep(0.05)
            raise RedisServerError(f"redis-server did not answer on port {self.port} within {timeout_s:.0f} s")
        except BaseException:
            self.stop()  # in its own session, it outlived its owner otherwise
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server (kill it if it does not exit within `timeout_s`)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)
        self.proc = None

    def cleanup(self) -> None:
        """stop() and remove the working directory if this object made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServerProcess:
        try:
            return self.start()
        except BaseException:
            self.cleanup()  # __exit__ is not called when this raises
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
