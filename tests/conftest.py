"""Shared fixtures: tiny checkpoints made once per session, a real redis-server."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from actors.models.make_model import make_model

from support import free_port, wait_until


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the servers the tests start and signal, also when the suite itself was started with SIGINT
    ignored (`nohup`, a background job of a script): an ignored signal stays ignored in every child process, so the
    tests of what `semipd serve` does on Ctrl-C would see it do nothing."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`model_factory("tiny-llama")` -> path of a random-weight checkpoint (seed 0), made once."""
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            made[preset] = make_model(preset, tmp_path_factory.mktemp(preset), seed=0)
        return made[preset]

    return get


@pytest.fixture(scope="session")
def tiny_llama(model_factory: Callable[[str], Path]) -> Path:
    return model_factory("tiny-llama")


class RedisServer:
    """A real redis-server on a free loopback port; stop() and start() to simulate outages."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (the Makefile installs Debian's package)")
        self.exe = exe
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 10, "redis-server to start", interval=0.05)

    def ping(self) -> bool:
        """Whether the server answers PING (False while it is not listening yet)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


# -- multi-node Ray cluster and a module-wide Redis (cluster tests) ---------------------------

NODE_RESOURCES = ("semipd_node_head", "semipd_node_a", "semipd_node_b")


@pytest.fixture(scope="module")
def ray_multinode() -> Iterator[object]:
    """A Ray cluster of three nodes on this machine, connected in namespace "semipd".

    Each node has one CPU and its own custom resource (NODE_RESOURCES: head, a, b), so
    actors can be pinned to nodes. Shut down at the end of the module.
    """
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    common = {"num_cpus": 1, "object_store_memory": 100 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "include_dashboard": False, "resources": {NODE_RESOURCES[0]: 1}})
    for res in NODE_RESOURCES[1:]:
        cluster.add_node(**common, resources={res: 1})
    ray.init(address=cluster.address, namespace="semipd", log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def ray_serve() -> Iterator[str]:
    """A one-node Ray instance (2 CPUs) with Ray Serve's HTTP proxy on a free loopback port, for a whole test
    module; yields the proxy's URL. Serve and Ray are shut down at the end of the module."""
    ray = pytest.importorskip("ray")
    from ray import serve

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=100 << 20)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A redis-server for a whole test module (`cluster.redis_server.RedisServerProcess`)."""
    from cluster.redis_server import RedisServerProcess

    server = RedisServerProcess(workdir=tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.cleanup()


NEAR_TIE = 1e-3  # logprob gap under which fp32 noise (threads, batch shapes) may flip a greedy choice


def greedy_mismatches(got: list[list[int]], reference: list[object]) -> list[str]:
    """Outputs of `got` that differ from `reference` (CompletionOutputs made with logprobs >= 1)
    anywhere but after a near-tie of the reference; returns a description of each."""
    bad = []
    for i, (ids, ref) in enumerate(zip(got, reference)):
        ref_ids = list(ref.token_ids)  # type: ignore[attr-defined]
        if ids == ref_ids:
            continue
        k = next((j for j, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
        top = ref.logprobs[k].top if k < len(ref.logprobs) else ()  # type: ignore[attr-defined]
        gap = abs(top[0][1] - top[1][1]) if len(top) >= 2 else float("inf")
        if len(ids) != len(ref_ids) or gap >= NEAR_TIE or ids[k] not in {t for t, _ in top[:2]}:
            bad.append(f"#{i}: differs at token {k} (reference top-2 gap {gap:.2g}): {ids} vs {ref_ids}")
    return bad


@pytest.fixture
def check_greedy() -> Callable[[list[list[int]], list[object]], None]:
    """`check_greedy(got_ids, reference_outputs)`: token ids equal a greedy reference run, up to near-ties."""
    def check(got: list[list[int]], reference: list[object]) -> None:
        bad = greedy_mismatches(got, reference)
        assert not bad, f"{len(bad)} outputs differ from the reference: " + "; ".join(bad[:3])
        near_ties = sum(1 for ids, ref in zip(got, reference) if ids != list(ref.token_ids))  # type: ignore[attr-defined]
        assert near_ties <= max(1, len(got) // 50), f"{near_ties} outputs differ after near-ties"
    return check
