"""Lifecycle of `semipd serve` and its parts: start-up interrupted by a signal, ports in use, the drain and its
deadline, a second Ctrl-C, a signal during the shutdown, a SIGTERM to the whole process group (which stops the
local Ray instance too), the private redis-server's process and directory, an engine actor shut down. Nothing the
command started may outlive it, and no client may be left hanging or cut off.

Most run in-process or in a small Python process with no Ray; `test_serve_ends_requests_past_the_drain` and
`test_sigterm_to_the_process_group_stops_everything_promptly` run the whole command (Ray, Serve, an engine actor),
and the `joined` tests run it with `--address` against the module's multi-node Ray cluster, whose engine other
front ends share.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.cli import main
from cluster.local_ray import process_running

from support import ROOT, ServeProcess, env_without_redis_url, free_port, stop_stray_redis, wait_until


def redis_answers(port: int) -> bool:
    from cluster.redis_server import ping

    return ping("127.0.0.1", port)


@pytest.fixture
def listening() -> Iterator[int]:
    """A port another server listens on (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


# -- a port in use -------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
def test_serve_refuses_a_port_in_use_before_starting_anything(tiny_llama: Path, listening: int, flag: str,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A port another server holds: a message and exit 2 before Redis, Ray or an engine starts (it was a
    traceback and exit 1 once all of them had started, from Serve's proxy or the gRPC server)."""
    import ray

    def must_not_start(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("serve started with a port it cannot bind")

    monkeypatch.delenv("SEMIPD_REDIS_URL", raising=False)
    monkeypatch.setattr("cluster.redis_server.RedisServerProcess", must_not_start)
    monkeypatch.setattr(ray, "init", must_not_start)
    other = "--grpc-port" if flag == "--http-port" else "--http-port"
    argv = ["serve", "--model", str(tiny_llama), "--device", "cpu", flag, str(listening), other, "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("semipd serve: error:") and f"{flag} {listening}" in err and "in use" in err


# -- the private redis-server ----------------------------------------------------------------------


def test_ctrl_c_while_the_private_redis_server_starts_stops_it_and_removes_its_directory(
        tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while `semipd serve` waits for its redis-server: exit 130, the server stopped, its directory gone
    (the server, in its own session, kept running: its object was not kept until it had answered)."""
    import cluster.redis_server as rs

    procs: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        procs.append(real_popen(*args, **kwargs))
        return procs[-1]

    def ping(host: str, port: int, timeout: float = 0.2) -> bool:
        raise KeyboardInterrupt

    monkeypatch.delenv("SEMIPD_REDIS_URL", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(rs.subprocess, "Popen", popen)
    monkeypatch.setattr(rs, "ping", ping)
    try:
        assert main(["serve", "--model", str(tiny_llama), "--device", "cpu", "--http-port", "0",
                     "--grpc-port", "0"]) == 130
        assert len(procs) == 1 and procs[0].poll() is not None, "the redis-server still runs"
        assert not list(tmp_path.glob("semipd-redis-*")), "its directory is left"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_redis_server_that_cannot_start_leaves_no_directory(tmp_path: Path, listening: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.redis_server import RedisServerError, RedisServerProcess

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(RedisServerError, match="taken"):
        with RedisServerProcess(port=listening):
            pass
    assert not list(tmp_path.glob("semipd-redis-*"))


# -- signals before and after serving (a small process: no Ray) -----------------------------------

START_UP = """
    import os, signal, sys
    import cluster.redis_server as rs
    from cluster.cli import main

    real_ping = rs.ping

    def ping(host, port, timeout=0.2):  # the redis-server runs: a signal now, while serve waits for it
        print("REDIS", port, flush=True)
        rs.ping = real_ping
        os.kill(os.getpid(), signal.SIG)
        return real_ping(host, port, timeout)

    rs.ping = ping
    sys.exit(main(["serve", "--model", sys.argv[1], "--device", "cpu", "--http-port", "0", "--grpc-port", "0"]))
"""

SHUTDOWN_PRELUDE = """
    import os, signal, sys, threading, types
    import ray
    from cluster.cli import build_parser
    from cluster.commands.serve import Started, _shutdown
    from cluster.local_ray import RayCalls
    from cluster.redis_server import RedisServerProcess

    # a private redis-server started, and a Ray that stands for a cluster
    args = build_parser().parse_args(["serve", "--model", sys.argv[1], "--device", "cpu"])
    redis = RedisServerProcess().start()
    print("REDIS", redis.port, flush=True)
    ray.is_initialized = lambda: True
    ray.shutdown = lambda: print("RAY SHUTDOWN", flush=True)
"""

SHUTDOWN = SHUTDOWN_PRELUDE + """
    # SIGTERM at its default action, as the serving loop's end leaves it
    started = Started(redis=redis, ray_started=True, cluster=types.SimpleNamespace(created=[]))
    started.endpoints["redis"] = redis.url

    def drain(cfg, timeout):  # a signal while the shutdown waits for the requests in flight
        os.kill(os.getpid(), signal.SIG)

    def teardown(cfg, names=None, controller=True, graceful=True):
        print("TEARDOWN", flush=True)

    try:
        _shutdown(args, started, drain, teardown, RayCalls(answers=lambda: True))
    except KeyboardInterrupt:
        sys.exit(130)
"""

GCS_LOST = SHUTDOWN_PRELUDE + """
    # a cluster whose GCS stops answering while the engines' shutdown waits for it
    gone = threading.Event()

    def teardown(cfg, names=None, controller=True, graceful=True):
        gone.set()
        threading.Event().wait()  # as a call to a GCS that is gone: no answer, and no signal reaches it

    started = Started(redis=redis, ray_started=True, cluster=types.SimpleNamespace(created=[]), drained=True, rc=0)
    started.endpoints["redis"] = redis.url
    _shutdown(args, started, None, teardown, RayCalls(answers=lambda: not gone.is_set()))
    print("RETURNED", flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the server stops with its owner through Linux's prctl")
def test_the_private_redis_server_ends_with_a_process_that_ends_at_once(tmp_path: Path) -> None:
    """A process that ends without running its `finally` blocks (killed, or ended at once by Ray's core worker
    when the Ray GCS is gone, as a SIGTERM to `make run`'s process group did) must not leave its private
    redis-server running: it is in a session of its own, so no signal to the owner's group reaches it."""
    import os

    owner = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom cluster.redis_server import RedisServerProcess\n"
         "r = RedisServerProcess().start()\nprint(r.port, r.proc.pid, flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    assert owner.stdout is not None
    port, pid = (int(x) for x in owner.stdout.readline().split())
    try:
        assert ping_redis(port)
        owner.kill()
        owner.wait(timeout=10)
        wait_until(lambda: not process_running(pid), 10, "the owner's redis-server to end")
        assert not ping_redis(port)
    finally:
        if process_running(pid):
            os.kill(pid, signal.SIGKILL)


def ping_redis(port: int) -> bool:
    from cluster.redis_server import ping

    return ping("127.0.0.1", port)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when,sig,code", [("start-up", signal.SIGTERM, 143), ("shutdown", signal.SIGTERM, 143),
                                           ("shutdown", signal.SIGINT, 130)],
                         ids=["sigterm-while-redis-starts", "sigterm-during-the-shutdown-drain",
                              "ctrl-c-during-the-shutdown-drain"])
def test_a_signal_before_or_after_serving_stops_everything_started(tiny_llama: Path, tmp_path: Path, when: str,
                                                                   sig: signal.Signals, code: int) -> None:
    """A signal while `semipd serve` starts or shuts down ends it with 128 + the signal's number, and everything
    it started is stopped first. SIGTERM's default action (before `ray.init`, and again once the serving loop
    ended) killed the process at once, and a Ctrl-C during the shutdown's drain skipped the rest of it: the
    redis-server, in its own session, kept running, and its directory was left."""
    script = textwrap.dedent(START_UP if when == "start-up" else SHUTDOWN).replace("signal.SIG)", f"signal.{sig.name})")
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_llama)], capture_output=True, text=True, cwd=ROOT,
                          env={**env_without_redis_url(), "TMPDIR": str(tmp_path)}, timeout=100)
    found = re.search(r"^REDIS (\d+)$", proc.stdout, re.M)
    assert found, proc.stdout + proc.stderr
    port = int(found.group(1))
    try:
        assert proc.returncode == code, proc.stdout + proc.stderr[-3000:]
        assert not redis_answers(port), "the redis-server still runs"
        assert not list(tmp_path.glob("semipd-redis-*")), "its directory is left"
        if when == "shutdown":  # the interrupted step only: the engines and Ray are still stopped
            assert "TEARDOWN" in proc.stdout and "RAY SHUTDOWN" in proc.stdout
    finally:
        stop_stray_redis(port)


@pytest.mark.timeout(120)
def test_a_shutdown_step_blocked_on_a_gcs_that_is_gone_is_left_behind(tiny_llama: Path, tmp_path: Path) -> None:
    """A step whose Ray call waits for a GCS that stops answering meanwhile (a signal to the process group
    stopped it) is left behind: the steps after it that need Ray are skipped, the rest run, and the process ends
    with the serving loop's status, past Ray's exit handler, which would wait for the GCS too."""
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(GCS_LOST), str(tiny_llama)], capture_output=True,
                          text=True, cwd=ROOT, env={**env_without_redis_url(), "TMPDIR": str(tmp_path)}, timeout=100)
    took = time.monotonic() - began
    found = re.search(r"^REDIS (\d+)$", proc.stdout, re.M)
    assert found, proc.stdout + proc.stderr
    port = int(found.group(1))
    try:
        assert proc.returncode == 0 and took < 30, (took, proc.stdout + proc.stderr[-3000:])
        assert "engine shutdown: left blocked in Ray" in proc.stderr and "semipd stopped" in proc.stderr
        assert "RAY SHUTDOWN" not in proc.stdout and "RETURNED" not in proc.stdout
        assert not redis_answers(port), "the redis-server still runs"
        assert not list(tmp_path.glob("semipd-redis-*")), "its directory is left"
    finally:
        stop_stray_redis(port)


def test_ray_calls_raise_what_a_call_raised_and_skip_calls_once_the_gcs_is_lost() -> None:
    from cluster.local_ray import GCS_LOST_AFTER_MISSES, RayCalls

    answers = [True, *[False] * GCS_LOST_AFTER_MISSES]
    calls = RayCalls(answers=lambda: answers.pop(0))
    ran: list[str] = []

    def fail() -> None:
        ran.append("fail")
        raise RuntimeError("no such actor")

    with pytest.raises(RuntimeError, match="no such actor"):
        calls.call("first", fail)
    calls.call("second", ran.append, "second")
    assert ran == ["fail"] and calls.lost and not calls.blocked and not answers


def test_ray_calls_take_a_gcs_that_misses_a_probe_but_answers_the_next_for_alive() -> None:
    """A GCS busy enough to miss one probe (a loaded machine) is not gone: the call runs."""
    from cluster.local_ray import RayCalls

    answers = [False, True]
    calls = RayCalls(answers=lambda: answers.pop(0))
    ran: list[str] = []
    calls.call("kill", ran.append, "kill")
    assert ran == ["kill"] and not calls.lost and not answers


# -- an engine actor shut down ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_engine_actor_shut_down_refuses_requests_even_after_resume(tiny_llama: Path) -> None:
    """`resume` after `shutdown` does not reopen the actor: a request it took would never get an answer from
    its stopped engine (and the actor answers pings, so a router would wait on it for good)."""
    from actors.gpu_actor import EngineActor
    from actors.request import SamplingParams
    from cluster.bootstrap import EngineOptions
    from cluster.engine_client import GenerateRequest, NoCapacityError

    actor = EngineActor("e-closed", EngineOptions(num_pages=64).engine_config(str(tiny_llama), "semi-pd"))

    async def main_() -> None:
        await actor.ready()
        await actor.shutdown()
        await actor.resume()
        with pytest.raises(NoCapacityError, match="shut down"):
            await actor.submit(GenerateRequest("late", [256, 1, 2], SamplingParams(max_tokens=4)), "sub")
        assert (await actor.load()).in_flight == 0

    asyncio.run(main_())


# -- `semipd serve` end to end: the drain deadline and a second Ctrl-C ---------------------------------


def serve_process(model: Path, http: int, drain_timeout: float) -> ServeProcess:
    return ServeProcess(["--model", str(model), "--device", "cpu", "--http-port", str(http), "--grpc-port", "0",
                         "--num-pages", "1024", "--drain-timeout", str(drain_timeout)])


def stream_completion(url: str, model: str, prompt: list[int], out: dict[str, Any]) -> None:
    """One long streamed completion; `out`: `tokens` so far, then `end` (`error-event`, `done` or the exception)
    and `ended` (its time.monotonic())."""
    import httpx

    out["tokens"] = 0
    body = dict(model=model, prompt=prompt, max_tokens=2000, temperature=0, ignore_eos=True, stream=True)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                out["end"] = f"status {r.status_code}"
                return
            for line in r.iter_lines():
                if line.startswith('data: {"error"'):
                    out["end"] = "error-event"
                elif line == "data: [DONE]":
                    out["end"] = out.get("end", "done")
                elif line.startswith("data: "):
                    out["tokens"] += 1
    except Exception as e:
        out["end"] = f"{type(e).__name__}: {e}"
    finally:
        out["ended"] = time.monotonic()


def tcp_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["drain-deadline", "second-ctrl-c"])
def test_serve_ends_requests_past_the_drain(tiny_llama: Path, case: str) -> None:
    """Requests still running when the drain ends, at its deadline or at a second Ctrl-C, end with an error event
    through the HTTP API, within the drain timeout, and everything the command started stops. Serve's shutdown
    came first and cut their connections mid-stream (after a second drain as long as the first), and a second
    Ctrl-C was ignored until the drain deadline."""
    http = free_port()
    drain_s = 3.0 if case == "drain-deadline" else 600.0
    server = serve_process(tiny_llama, http, drain_s)
    clients: list[dict[str, Any]] = [{} for _ in range(4)]
    try:
        server.read_until("serving; Ctrl-C to stop", 180)
        out = "".join(server.seen)
        redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)/0", out).group(1))  # type: ignore[union-attr]
        gcs = re.search(r"^\s+ray\s+(\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{http}"
        threads = [threading.Thread(target=stream_completion, args=(url, tiny_llama.name, [256, 7, i], c), daemon=True)
                   for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        wait_until(lambda: all(c.get("tokens", 0) > 0 or "end" in c for c in clients), 60, "every stream to start")
        assert not any("end" in c for c in clients), clients
        if case == "drain-deadline":
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            server.read_until("still in flight at the drain deadline", 30)
        else:
            server.proc.send_signal(signal.SIGINT)
            server.read_until("draining", 30)
            server.proc.send_signal(signal.SIGINT)
            signalled = time.monotonic()
        for t in threads:
            t.join(timeout=60)
        ends = [(c.get("end"), round(c.get("ended", float("inf")) - signalled, 1)) for c in clients]
        assert all(end == "error-event" for end, _ in ends), ends
        assert all(after < (drain_s if case == "drain-deadline" else 0) + 20 for _, after in ends), ends
        server.read_until("semipd stopped", 90)
        assert server.proc.wait(timeout=30) == (0 if case == "drain-deadline" else 130)
        assert not redis_answers(redis_port), "the redis-server still runs"
        wait_until(lambda: not tcp_open(gcs), 20, "Ray's GCS to stop")
    finally:
        server.stop()


def session_processes(sid: int) -> dict[int, str]:
    """The processes of session `sid` that have not ended (zombies have): pid -> name."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, process group, session
            out[int(pid)] = name
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="reads processes' sessions from /proc")
@pytest.mark.timeout(240)
def test_sigterm_to_the_process_group_stops_everything_promptly(tiny_llama: Path) -> None:
    """SIGTERM to the whole process group (docker stop, systemd, Kubernetes, `kill -TERM -PGID`) reaches the Ray
    instance `semipd serve` started (its GCS and raylet are in the group) as well: the request in flight ends
    (drained until the deadline, or cut short by the end of Ray's processes), the shutdown skips what needs the
    GCS, and the command exits 0 within seconds with nothing it started left running. Its shutdown waited in a
    call to the stopped GCS until Ray's core worker ended the process a minute later, with exit 1 and no
    "semipd stopped"."""
    http = free_port()
    server = ServeProcess(["--model", str(tiny_llama), "--device", "cpu", "--http-port", str(http), "--grpc-port",
                           "0", "--num-pages", "1024", "--drain-timeout", "3"], new_session=True)
    sid = server.proc.pid
    client: dict[str, Any] = {}
    try:
        server.read_until("serving; Ctrl-C to stop", 180)
        redis_port = server.redis_port
        assert redis_port is not None
        names = session_processes(sid).values()
        assert {"gcs_server", "raylet"} <= set(names) and any(n.startswith("ray::") for n in names), names
        stream = threading.Thread(target=stream_completion, args=(f"http://127.0.0.1:{http}", tiny_llama.name,
                                                                  [256, 7, 1], client), daemon=True)
        stream.start()
        wait_until(lambda: client.get("tokens", 0) > 0 or "end" in client, 60, "the stream to start")
        assert "end" not in client, client
        os.killpg(sid, signal.SIGTERM)
        signalled = time.monotonic()
        server.read_until("semipd stopped", 25)
        assert server.proc.wait(timeout=max(0.1, signalled + 25 - time.monotonic())) == 0
        exited = time.monotonic() - signalled
        out = "".join(server.seen)
        assert "Ray's GCS does not answer" in out, out[-3000:]
        assert session_processes(sid) == {}, f"left running {exited:.1f} s after the signal"
        assert not redis_answers(redis_port), "the redis-server still runs"
        stream.join(timeout=10)
        assert client.get("ended", float("inf")) - signalled < 25, client
    finally:
        for pid in session_processes(sid):
            os.kill(pid, signal.SIGKILL)
        server.stop()


# -- `semipd serve --address`: joined to a cluster whose engines other front ends share -------------


@pytest.fixture(scope="module")
def shared_engine(ray_multinode: Any, tiny_llama: Path) -> Iterator[Any]:
    """`semipd-engine-0`, started here as another front end (another `semipd serve`, the Serve app) would."""
    from cluster.bootstrap import ClusterConfig, EngineOptions, ensure_cluster, teardown_cluster

    cfg = ClusterConfig(model=str(tiny_llama), num_actors=1, engine=EngineOptions(num_pages=256), ready_timeout_s=120)
    ensure_cluster(cfg)
    try:
        yield cfg
    finally:
        teardown_cluster(cfg)


def named_actors() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "semipd"}


def serves(cfg: Any) -> tuple[str | None, str | None]:
    """(finish reason, error) of one request to the engines of `cfg` through a Router of this process."""
    from actors.request import SamplingParams
    from cluster.engine_client import GenerateRequest
    from cluster.router import Router

    from support import collect

    async def one() -> tuple[str | None, str | None]:
        router = Router.connect(names=cfg.actor_names, namespace=cfg.namespace)
        _, finish, error = await collect(router, GenerateRequest(f"probe-{time.monotonic_ns()}", [256, 1, 2],
                                                                 SamplingParams(max_tokens=3, ignore_eos=True)))
        return finish, error

    return asyncio.run(one())


def joined_serve(ray_multinode: Any, model: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", "serve", "--address", ray_multinode.address, "--model", str(model),
            "--device", "cpu", "--num-pages", "256", "--http-port", "0", "--grpc-port", "0", *flags]


@pytest.mark.timeout(300)
def test_serve_joined_to_a_cluster_leaves_the_engines_it_found_serving(ray_multinode: Any, shared_engine: Any,
                                                                       tiny_llama: Path) -> None:
    """`semipd serve --address` drains the engines when it stops, and stops only those it started: the engines it
    found serve the other front ends again (they were left draining, refusing every request, for good)."""
    proc = subprocess.run(joined_serve(ray_multinode, tiny_llama, "--self-test", "--exit-after-self-test"),
                          capture_output=True, text=True, cwd=ROOT, env=env_without_redis_url(), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "self-test via the Router" in proc.stdout
    assert named_actors() >= {"semipd-engine-0"}
    wait_until(lambda: "semipd-engine-controller" not in named_actors(), 30, "the controller it started to stop")
    assert serves(shared_engine) == ("length", None)


@pytest.mark.timeout(300)
def test_serve_joined_to_a_cluster_interrupted_while_its_engine_starts_stops_it(ray_multinode: Any,
                                                                                shared_engine: Any,
                                                                                tiny_llama: Path) -> None:
    """Ctrl-C while `semipd serve --address` waits for an engine actor it started: exit 130, and that actor
    (detached, in a cluster that outlives the command) is stopped; it ran on with nothing to stop it."""
    import ray

    proc = subprocess.Popen(joined_serve(ray_multinode, tiny_llama, "--num-actors", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env_without_redis_url())
    try:
        wait_until(lambda: "semipd-engine-1" in named_actors() or proc.poll() is not None, 120,
                   "the engine actor it starts", interval=0.1)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 130, out
        wait_until(lambda: "semipd-engine-1" not in named_actors(), 30,
                   f"the engine it started to stop; the command printed:\n{out}")
        assert serves(shared_engine) == ("length", None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            ray.kill(ray.get_actor("semipd-engine-1", namespace="semipd"), no_restart=True)
        except ValueError:
            pass


SERVE_BESIDE_ENGINES = """
    import sys, time
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    import cluster.bootstrap as bootstrap
    from cluster.cli import main

    start_engines = bootstrap.ensure_cluster

    def serve_controller_up():
        try:
            return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE) is not None
        except ValueError:
            return False

    def ensure_cluster(cfg, created):  # the engines' start, waiting (30 s at most) for Serve's controller
        deadline = time.monotonic() + 30
        while not serve_controller_up() and time.monotonic() < deadline:
            time.sleep(0.1)
        print("SERVE UP WHILE THE ENGINES START" if serve_controller_up() else "NO SERVE YET", flush=True)
        if sys.argv[2] == "fail":
            raise RuntimeError("the engines failed to start")
        return start_engines(cfg, created=created)

    bootstrap.ensure_cluster = ensure_cluster
    sys.exit(main(["serve", "--model", sys.argv[1], "--device", "cpu", "--http-port", sys.argv[3], "--grpc-port",
                   "0", "--self-test", "--exit-after-self-test"]))
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize("engines", ["start", "fail"])
def test_serve_starts_its_http_proxy_while_the_engines_start(tiny_llama: Path, engines: str) -> None:
    """Ray Serve's controller and HTTP proxy come up while the engine actors load, not after them (on the H100
    their 29 s followed the engines' 45 s); the self-test then answers through them. When the engines fail to
    start, the command ends with the error (exit 1) and stops the Serve it started: its HTTP port is free."""
    port = free_port()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SERVE_BESIDE_ENGINES), str(tiny_llama), engines,
                           str(port)], capture_output=True, text=True, cwd=ROOT, env=env_without_redis_url(),
                          timeout=220)
    out = proc.stdout + proc.stderr[-3000:]
    assert "SERVE UP WHILE THE ENGINES START" in proc.stdout, out
    assert "semipd stopped" in proc.stderr, out
    if engines == "start":
        assert proc.returncode == 0, out
        assert "self-test via HTTP /v1/completions" in proc.stdout and "self-test FAILED" not in proc.stdout, out
    else:
        assert proc.returncode == 1 and "the engines failed to start" in proc.stderr, out
    with socket.socket() as s:  # Serve's proxy is gone with the command
        s.bind(("127.0.0.1", port))


def test_serve_without_a_working_redis_server_is_a_message_not_a_traceback(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """redis-server missing (or not coming up) ends `semipd serve` with its reason and exit 1, before Ray starts."""
    from cluster.cli import main
    from cluster.redis_server import RedisServerError, RedisServerProcess

    def missing(self: RedisServerProcess, timeout_s: float = 10.0) -> RedisServerProcess:
        raise RedisServerError("redis-server is not installed (Debian: apt-get install redis-server)")

    monkeypatch.setattr(RedisServerProcess, "start", missing)
    assert main(["serve", "--model", str(tiny_llama), "--device", "cpu", "--http-port", "0", "--grpc-port", "0"]) == 1
    err = capsys.readouterr().err
    assert "semipd serve: error: redis-server is not installed" in err and "Traceback" not in err
