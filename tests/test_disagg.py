"""Disaggregated baseline: a prefill-only and a decode-only engine over separate KV pools.

Greedy tokens equal the unified engine's, the transport moves exactly the KV of each
prompt's pages, and every page comes back on both sides, aborts included. Then the `disagg`
serving mode: an engine actor whose core is a pair (in-process and on a local Ray cluster),
and its configuration errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.config import CacheConfig, ConfigError, EngineConfig, ModelArch, SchedulerConfig
from actors.disagg.engines import DecodeOnlyEngine, PrefillOnlyEngine
from actors.disagg.frontend import DisaggLLM
from actors.disagg.pair import DisaggPair, pair_devices
from actors.disagg.state import state_of
from actors.disagg.transport import CpuTransport, DeviceTransport, KVPayload, KVTransport, RequestState
from actors.engine.core import EngineCore, PromptTooLongError
from actors.engine.frontend import LLM
from actors.kv.manager import pages_for
from actors.request import FinishReason, Request, SamplingParams, TokenDelta
from cluster.bootstrap import ClusterConfig, EngineOptions, ensure_cluster, gpus_per_actor, teardown_cluster
from cluster.engine_client import GenerateRequest
from cluster.serve_app import ServeArgs

from support import actor_stream, collect, wait_until

CHUNK = 64  # prefill token budget: prompts above it take several iterations
PAGE = 16
P_PAGES, D_PAGES = 48, 160
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
LENGTHS = (3, 15, 16, 17, 40, 64, 65, 100, 150, 230)

pytestmark = pytest.mark.timeout(120)  # a lost request hangs generate(): fail instead


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in LENGTHS]


def kv_bytes_per_page(model_dir: Path) -> int:
    a = ModelArch.from_dir(model_dir)
    return a.num_layers * 2 * PAGE * a.num_kv_heads * a.head_dim * 4  # fp32


def assert_all_pages_back(pair: DisaggPair) -> None:
    for engine in (pair.prefill, pair.decode):
        wait_until(lambda e=engine: e.allocator.num_free == e.allocator.num_blocks, 10, "all pages freed")
        engine.allocator.check_integrity()


@pytest.fixture
def disagg_llm(tiny_llama: Path) -> Iterator[DisaggLLM]:
    llm = DisaggLLM(tiny_llama, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
                    prefill_cache=CacheConfig(page_size=PAGE, num_pages=P_PAGES),
                    decode_cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES))
    yield llm
    llm.shutdown()


def test_greedy_tokens_equal_unified_and_bytes_are_exact(
    tiny_llama: Path, disagg_llm: DisaggLLM, check_greedy: Callable[[list[list[int]], list[object]], None]
) -> None:
    prompts = make_prompts()
    with LLM(tiny_llama, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
             cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES)) as unified:
        reference = unified.generate(prompts, GREEDY)
    outs = disagg_llm.generate(prompts, GREEDY)

    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
    check_greedy([o.token_ids for o in outs], reference)
    pair = disagg_llm.pair
    assert pair.decode.num_preemptions == 0  # else some KV would have moved twice
    assert pair.decode.num_imported == len(prompts)
    expected = sum(pages_for(len(p), PAGE) for p in prompts) * kv_bytes_per_page(tiny_llama)
    assert disagg_llm.transport.bytes_moved == expected
    assert pair.num_unfinished == 0
    assert_all_pages_back(pair)


def test_prompt_logprobs_come_from_the_prefill_engine_as_in_unified_mode(tiny_llama: Path,
                                                                         disagg_llm: DisaggLLM) -> None:
    prompts = make_prompts()[:4]
    params = dataclasses.replace(GREEDY, prompt_logprobs=1)
    with LLM(tiny_llama, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
             cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES)) as unified:
        reference = unified.generate(prompts, params)
    outs = disagg_llm.generate(prompts, params)
    for p, got, want in zip(prompts, outs, reference):
        assert [lp.token_id for lp in got.prompt_logprobs] == p[1:]
        assert [lp.logprob for lp in got.prompt_logprobs] == pytest.approx([lp.logprob for lp in want.prompt_logprobs],
                                                                           abs=1e-4)


def test_decode_pool_smaller_than_the_load_queues_imports(tiny_llama: Path,
                                                          check_greedy: Callable[..., None]) -> None:
    """A decode pool that holds about two requests: imports wait for pages, decodes preempt and
    go back to prefill for recomputation, and the tokens are still the unified engine's. Whether prefill also
    waits for room in flight here depends on thread timing (the importer may keep up): the wait itself is
    `test_transport_holds_a_send_until_the_receiver_releases_room`'s."""
    prompts = make_prompts(1)[4:]  # 40..230 tokens
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    with LLM(tiny_llama, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
             cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES)) as unified:
        reference = unified.generate(prompts, params)
    with DisaggLLM(tiny_llama, device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
                   prefill_cache=CacheConfig(page_size=PAGE, num_pages=P_PAGES),
                   decode_cache=CacheConfig(page_size=PAGE, num_pages=17)) as llm:
        outs = llm.generate(prompts, params)
        check_greedy([o.token_ids for o in outs], reference)
        assert llm.transport.bytes_moved >= sum(pages_for(len(p), PAGE) for p in prompts) * kv_bytes_per_page(tiny_llama)
        pool = llm.pair.decode.pool.kv
        assert llm.transport.max_in_flight_bytes == int(0.25 * pool.numel() * pool.element_size())
        assert llm.transport.in_flight_bytes == 0
        assert_all_pages_back(llm.pair)


class _FailsOnce(CpuTransport):
    """Its first send raises, as a copy that fails on the device would."""

    failed = False

    def send(self, payload: KVPayload) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("copy failed")
        super().send(payload)


def test_a_failed_export_ends_its_request_and_the_rest_are_served(tiny_llama: Path) -> None:
    """A prompt whose KV cannot be sent ends with an error naming why, its prefill pages come back, and the other
    requests finish as usual (none is lost between the engines)."""
    prompts = make_prompts(6)[:4]
    with DisaggLLM(tiny_llama, transport=_FailsOnce(), device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
                   prefill_cache=CacheConfig(page_size=PAGE, num_pages=P_PAGES),
                   decode_cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES)) as llm:
        outs = llm.generate(prompts, GREEDY)
        reasons = sorted(o.finish_reason for o in outs)
        assert reasons == ["error", "length", "length", "length"], reasons
        failed = next(o for o in outs if o.finish_reason == "error")
        assert "KV export failed: copy failed" in (failed.error or "")
        assert llm.pair.num_unfinished == 0 and llm.pair.decode.num_imported == 3
        assert_all_pages_back(llm.pair)


def test_the_decode_reserve_is_checked_against_the_prefill_pool_only(tiny_llama: Path) -> None:
    """`decode_reserve_pages` holds back pages of the pool that prefill admission draws from: a reserve of the whole
    decode pool (smaller here) does not stop the pair, which serves; one of the whole prefill pool does."""
    sched = SchedulerConfig(max_prefill_tokens=CHUNK, decode_reserve_pages=17)
    with DisaggLLM(tiny_llama, device="cpu", scheduler=sched,
                   prefill_cache=CacheConfig(page_size=PAGE, num_pages=P_PAGES),
                   decode_cache=CacheConfig(page_size=PAGE, num_pages=17)) as llm:
        outs = llm.generate(make_prompts(6)[:2], GREEDY)
        assert [o.finish_reason for o in outs] == ["length", "length"]
    with pytest.raises(ConfigError, match=rf"decode_reserve_pages \({P_PAGES}\) must be less than the KV cache's "
                                          rf"{P_PAGES} pages"):
        DisaggLLM(tiny_llama, device="cpu", scheduler=dataclasses.replace(sched, decode_reserve_pages=P_PAGES),
                  prefill_cache=CacheConfig(page_size=PAGE, num_pages=P_PAGES),
                  decode_cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES))


def test_an_importer_that_cannot_start_fails_the_start(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The importer thread's set-up failing (on a GPU: making the pool's device current) fails the engine's start
    with the cause, instead of an engine whose requests all wait for an import that never comes."""
    def refuse(self: DecodeOnlyEngine) -> None:
        raise ValueError("no such device")

    monkeypatch.setattr(DecodeOnlyEngine, "_enter_import_thread", refuse)
    with pytest.raises(RuntimeError, match="KV importer could not start") as failure:
        DisaggLLM(tiny_llama, device="cpu", prefill_cache=CacheConfig(page_size=PAGE, num_pages=P_PAGES),
                  decode_cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES))
    assert isinstance(failure.value.__cause__, ValueError)
    assert not any(t.name == "semipd-kv-import" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("failing", [PrefillOnlyEngine, EngineCore], ids=["prefill engine", "decode worker"])
def test_a_pair_that_cannot_start_leaves_no_thread_running(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch,
                                                           failing: type) -> None:
    """A pair starts both engines or neither: when the prefill engine (started second) or the decode engine's worker
    (after its importer) cannot start, what did start stops again."""
    def refuse(self: EngineCore) -> None:
        raise RuntimeError("worker could not start")

    monkeypatch.setattr(failing, "start", refuse)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="worker could not start"):
        DisaggLLM(tiny_llama, device="cpu", prefill_cache=CacheConfig(page_size=PAGE, num_pages=P_PAGES),
                  decode_cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES))
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("semipd-")]
    assert not left, f"threads still running: {left}"


def _payload(rid: str, pages: int) -> KVPayload:
    req = Request(rid, [1, 2, 3], 3, SamplingParams())
    return KVPayload(state_of(req), torch.zeros(2, pages, 2, PAGE, 1, 4))  # 1 KiB per page


def test_transport_holds_a_send_until_the_receiver_releases_room() -> None:
    """KV sent and not released stays within `max_in_flight_bytes`: a send past it waits for a release
    (or `close`); one payload always goes when nothing is in flight, however large."""
    transport = CpuTransport()
    transport.max_in_flight_bytes = 3 * 1024
    transport.send(_payload("big", 5))  # alone: goes
    assert transport.in_flight_bytes == 5 * 1024
    blocked = threading.Thread(target=transport.send, args=(_payload("next", 1),))
    blocked.start()
    wait_until(lambda: transport.num_waits == 1, 10, "the second send waiting")
    assert transport.num_sent == 1
    transport.release(transport.receive(1.0))
    blocked.join(10)
    assert not blocked.is_alive() and transport.num_sent == 2 and transport.in_flight_bytes == 1024

    transport.send(_payload("fits", 2))  # 1 + 2 KiB <= 3 KiB
    waiting = threading.Thread(target=transport.send, args=(_payload("over", 1),))
    waiting.start()
    wait_until(lambda: transport.num_waits == 2, 10, "the fourth send waiting")
    transport.close()  # shutdown: nobody will release
    waiting.join(10)
    assert not waiting.is_alive() and transport.num_sent == 4
    with pytest.raises(ValueError, match="max_in_flight_bytes must be >= 1"):
        DeviceTransport(torch.device("cpu"), max_in_flight_bytes=0)
    once = CpuTransport()
    payload = _payload("once", 1)
    once.send(payload)
    once.release(payload)
    with pytest.raises(RuntimeError, match="released twice"):
        once.release(payload)
    assert once.in_flight_bytes == 0


# -- aborts, stepped by hand (no worker threads) so each lands where the test says ------------

class Collected:
    def __init__(self) -> None:
        self.deltas: list[TokenDelta] = []

    def __call__(self, deltas: list[TokenDelta]) -> None:
        self.deltas.extend(deltas)

    def finish_of(self, rid: str) -> FinishReason | None:
        return next((d.finish_reason for d in self.deltas if d.request_id == rid and d.finished), None)


def stepped_pair_over(model: Path, transport: KVTransport) -> tuple[DisaggPair, Collected]:
    """A CPU pair (P_PAGES and D_PAGES pages) over `transport` and what it emits, not started: its tests step the
    workers themselves, one iteration per step, its prompts exported by that step."""
    base = EngineConfig(model=str(model), device="cpu", scheduler=SchedulerConfig(max_prefill_tokens=CHUNK),
                        overlap_prefill=False)
    out = Collected()
    pair = DisaggPair(dataclasses.replace(base, cache=CacheConfig(page_size=PAGE, num_pages=P_PAGES)),
                      dataclasses.replace(base, cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES)), out, transport)
    return pair, out


@pytest.fixture
def stepped_pair(tiny_llama: Path) -> Iterator[tuple[DisaggPair, Collected]]:
    yield stepped_pair_over(tiny_llama, CpuTransport())


LONG = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)


def test_abort_during_prefill_frees_prefill_pages(stepped_pair: tuple[DisaggPair, Collected]) -> None:
    pair, out = stepped_pair
    pair.add_request("a", make_prompts(2)[-1], LONG)  # 230 tokens: four chunks
    prefill = pair.prefill.workers[0]
    assert prefill.step()
    assert pair.prefill.allocator.num_free < P_PAGES  # holds pages for its first chunk
    assert pair.abort("a")
    prefill.step()
    assert out.finish_of("a") == FinishReason.ABORT
    assert pair.transport.bytes_moved == 0
    assert pair.num_unfinished == 0
    assert_all_pages_back(pair)


def test_abort_in_transit_and_on_decode(stepped_pair: tuple[DisaggPair, Collected]) -> None:
    pair, out = stepped_pair
    prompt = make_prompts(3)[-1][:30]  # two of them fit one chunk
    pair.add_request("transit", prompt, LONG)
    pair.add_request("decoding", prompt[::-1], LONG)
    assert pair.prefill.workers[0].step()  # both prefilled in one batch and exported
    assert pair.transport.num_sent == 2  # type: ignore[attr-defined]
    assert pair.prefill.allocator.num_free == P_PAGES  # exported pages are freed at once
    assert pair.abort("transit")  # in the queue: applied when the decode side receives it
    pair.decode.poll_imports(timeout=1.0)
    pair.decode.poll_imports(timeout=1.0)
    assert out.finish_of("transit") == FinishReason.ABORT
    assert pair.decode.num_imported == 1
    decode = pair.decode.workers[0]
    for _ in range(3):
        assert decode.step()
    held = D_PAGES - pair.decode.allocator.num_free
    assert held == pages_for(len(prompt) + 3, PAGE)
    assert pair.abort("decoding")
    decode.step()
    assert out.finish_of("decoding") == FinishReason.ABORT
    tokens = [t for d in out.deltas if d.request_id == "decoding" for t in d.new_token_ids]
    assert len(tokens) == 4  # the first from prefill, three from decode
    assert pair.num_unfinished == 0
    assert_all_pages_back(pair)


def test_a_failed_import_ends_its_request_gives_its_pages_back_and_the_next_imports(
        stepped_pair: tuple[DisaggPair, Collected], monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload that fails to import after its decode pages were taken (here: rebuilding its request) ends with an
    error naming why, those pages come back, and the payload behind it is imported as usual."""
    import actors.disagg.engines as engines

    pair, out = stepped_pair
    prompt = make_prompts(3)[-1][:30]
    pair.add_request("fails", prompt, LONG)
    pair.add_request("next", prompt[::-1], LONG)
    assert pair.prefill.workers[0].step()  # both prefilled and exported
    rebuild = engines.request_from
    calls = []

    def fail_first(state: RequestState, device: torch.device) -> Request:
        calls.append(state.request_id)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return rebuild(state, device)

    monkeypatch.setattr(engines, "request_from", fail_first)
    with pytest.raises(RuntimeError, match="out of memory"):
        pair.decode.poll_imports(timeout=1.0)
    ended = next(d for d in out.deltas if d.request_id == "fails" and d.finished)
    assert ended.finish_reason == FinishReason.ERROR and ended.error == "KV import failed: out of memory"
    assert pair.decode.allocator.num_free == pair.decode.allocator.num_blocks  # its pages are back
    pair.decode.poll_imports(timeout=1.0)
    assert calls == ["fails", "next"] and pair.decode.num_imported == 1
    assert pair.transport.in_flight_bytes == 0  # type: ignore[attr-defined]
    assert pair.abort("next")
    pair.decode.workers[0].step()
    assert out.finish_of("next") == FinishReason.ABORT and pair.num_unfinished == 0
    assert_all_pages_back(pair)


def test_a_handoff_that_waits_for_decode_pages_counts_the_wait(stepped_pair: tuple[DisaggPair, Collected]) -> None:
    """The transfer time ends when the decode engine has the KV; the handoff time when the request is in its
    decode batch, after it waited for pages."""
    pair, out = stepped_pair
    pair.add_request("a", make_prompts(3)[-1][:30], LONG)
    assert pair.prefill.workers[0].step()  # prefilled and exported
    held = pair.decode.allocator.allocate(pair.decode.allocator.num_free)
    assert held is not None
    pair.decode.poll_imports(timeout=1.0)
    transfer, handoff = pair.decode.transfer_times, pair.decode.handoff_times
    assert (transfer.count, handoff.count, pair.decode.num_backlogged) == (1, 0, 1)  # here, waiting for pages
    pair.decode.allocator.free(held)
    pair.decode.poll_imports(timeout=0.0)
    assert (transfer.count, handoff.count, pair.decode.num_imported) == (1, 1, 1)
    assert handoff.sum_s >= transfer.sum_s > 0
    assert pair.transfer_stats() == {"kv_transfer_bytes": pair.transport.bytes_moved,
                                     "kv_transfer_seconds": transfer.to_dict(), "kv_handoff_seconds": handoff.to_dict()}
    assert pair.abort("a")
    pair.decode.workers[0].step()
    assert out.finish_of("a") == FinishReason.ABORT
    assert_all_pages_back(pair)


# -- the `disagg` serving mode: an engine actor whose core is a DisaggPair -----------------------


def served_prompts() -> list[list[int]]:
    return make_prompts(5)[:6]  # 3 to 64 tokens


def expected_kv_bytes(model_dir: Path, prompts: list[list[int]]) -> int:
    return sum(pages_for(len(p), PAGE) for p in prompts) * kv_bytes_per_page(model_dir)


async def actor_tokens(actor: Any, request: GenerateRequest) -> list[int]:
    chunks = [c async for c in actor_stream(actor, request)]
    assert chunks[-1].finish_reason == "length", chunks[-1]
    return [t for c in chunks for t in c.token_ids]


@pytest.fixture
def unified_reference(tiny_llama: Path) -> list[object]:
    with LLM(tiny_llama, device="cpu", cache=CacheConfig(page_size=PAGE, num_pages=D_PAGES)) as llm:
        return llm.generate(served_prompts(), GREEDY)


def test_engine_actor_in_disagg_mode(tiny_llama: Path, unified_reference: list[object],
                                     check_greedy: Callable[..., None]) -> None:
    from actors.gpu_actor import EngineActor
    from cluster.metrics import ServingMetrics

    cfg = EngineOptions(device="cpu", num_pages=D_PAGES).engine_config(str(tiny_llama), "disagg")
    actor = EngineActor("disagg-0", cfg)
    assert isinstance(actor.llm.core, DisaggPair) and isinstance(actor.llm.core.transport, DeviceTransport)
    prompts = served_prompts()

    async def main() -> None:
        info = await actor.ready()
        assert info["mode"] == "disagg" and info["splits"] == [info["total_sms"]]
        got = await asyncio.gather(*(actor_tokens(actor, GenerateRequest(f"r{i}", p, GREEDY))
                                     for i, p in enumerate(prompts)))
        check_greedy(list(got), unified_reference)
        load = await actor.load()
        assert load.healthy and load.in_flight == 0 and load.stats["finish_reasons"] == {"length": len(prompts)}
        assert load.stats["kv_transfer_bytes"] == expected_kv_bytes(tiny_llama, prompts)
        assert load.stats["iterations"]["prefill"] > 0 and load.stats["iterations"]["decode"] > 0
        transfer, handoff = load.stats["kv_transfer_seconds"], load.stats["kv_handoff_seconds"]
        assert sum(transfer["counts"]) == sum(handoff["counts"]) == len(prompts)  # each request once
        assert 0 < transfer["sum"] <= handoff["sum"]  # received, then in the decode batch
        metrics = ServingMetrics("tiny")
        metrics.update_loads([load])
        text = metrics.render()[0].decode()
        assert (f'semipd:kv_transfer_bytes_total{{engine="disagg-0",model_name="tiny"}} '
                f'{float(load.stats["kv_transfer_bytes"])}') in text
        assert f'semipd:kv_handoff_seconds_count{{engine="disagg-0",model_name="tiny"}} {float(len(prompts))}' in text
        with pytest.raises(ValueError, match="disagg mode: it has no SM split"):
            await actor.apply_split(1, "test")
        with pytest.raises(PromptTooLongError, match="^This model's maximum context length"):
            await actor_tokens(actor, GenerateRequest("too-long", [1] * 100, SamplingParams(max_tokens=100_000)))
        again = await actor_tokens(actor, GenerateRequest("after", prompts[0], GREEDY))
        assert again == got[0]
        await actor.shutdown()

    asyncio.run(main())


@pytest.fixture(scope="module")
def disagg_cluster(ray_multinode: Any, tiny_llama: Path) -> Iterator[ClusterConfig]:
    cfg = ClusterConfig(model=str(tiny_llama), num_actors=2, mode="disagg", actor_prefix="disagg",
                        engine=EngineOptions(device="cpu", num_pages=D_PAGES), ready_timeout_s=120)
    handles = ensure_cluster(cfg)
    assert sorted(handles.created) == cfg.actor_names and handles.controller is None
    try:
        yield cfg
    finally:
        teardown_cluster(cfg)


async def router_tokens(router: Any, request: GenerateRequest) -> list[int]:
    ids, finish, _ = await collect(router, request)
    assert finish == "length", finish
    return ids


@pytest.mark.timeout(180)
def test_served_disagg_mode_through_the_router(disagg_cluster: ClusterConfig, tiny_llama: Path,
                                               unified_reference: list[object],
                                               check_greedy: Callable[..., None]) -> None:
    from actors.slo.types import SLOTargets
    from cluster.commands.status import engine_row
    from cluster.router import Router

    router = Router.connect(namespace=disagg_cluster.namespace, prefix=disagg_cluster.actor_prefix)
    assert router.model_info().mode == "disagg"
    prompts = served_prompts()

    async def main() -> list[Any]:
        got = await asyncio.gather(*(router_tokens(router, GenerateRequest(f"s{i}", p, GREEDY))
                                     for i, p in enumerate(prompts)))
        check_greedy(list(got), unified_reference)
        with pytest.raises(PromptTooLongError, match="^This model's maximum context length"):
            await router_tokens(router, GenerateRequest("too-long", [1] * 100, SamplingParams(max_tokens=100_000)))
        assert await router_tokens(router, GenerateRequest("after", prompts[1], GREEDY)) == got[1]
        return await router.loads()

    loads = asyncio.run(main())
    assert sorted(l.engine_id for l in loads) == disagg_cluster.actor_names and all(l.healthy for l in loads)
    rows = [engine_row(l.to_dict(), SLOTargets()) for l in loads]
    assert sum(r["kv_transfer_bytes"] for r in rows) == expected_kv_bytes(tiny_llama, [*prompts, prompts[1]])
    assert all((r["kv_handoff_ms"] or 0) > 0 for r in rows if r["kv_transfer_bytes"])  # `semipd status` shows it


# -- configuration errors ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_gpus_per_actor=1), "takes 2 GPUs"),
    (dict(num_gpus_per_actor=3), "takes 2 GPUs"),
    (dict(engine=EngineOptions(admission="reject")), "no admission control"),
])
def test_disagg_cluster_config_errors(tiny_llama: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClusterConfig(model=str(tiny_llama), mode="disagg", **kwargs)


def test_disagg_actors_take_two_gpus_each(tiny_llama: Path) -> None:
    cfg = ClusterConfig(model=str(tiny_llama), num_actors=2, mode="disagg")
    assert gpus_per_actor(cfg, 0) == 0.0 and gpus_per_actor(cfg, 4) == 2.0 and gpus_per_actor(cfg, 5) == 2.0
    with pytest.raises(ConfigError, match="2 engine actor\\(s\\) need 4 GPUs"):
        gpus_per_actor(cfg, 3)
    assert gpus_per_actor(dataclasses.replace(cfg, mode="semi-pd"), 3) == 1.0
    assert ServeArgs.parse({"model": str(tiny_llama), "mode": "disagg"}).mode == "disagg"


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has two GPUs for a pair")
def test_a_gpu_pair_needs_two_gpus() -> None:
    with pytest.raises(ConfigError, match="two GPUs per engine"):
        pair_devices(torch.device("cuda"))
    assert pair_devices(torch.device("cpu")) == (torch.device("cpu"), torch.device("cpu"))


def test_serve_disagg_refuses_admission_before_starting(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.cli import main

    assert main(["serve", "--model", str(tiny_llama), "--device", "cpu", "--mode", "disagg",
                 "--admission", "reject"]) == 2
    assert "disagg mode has no admission control" in capsys.readouterr().err
