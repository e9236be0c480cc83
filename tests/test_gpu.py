"""GPU path: flashinfer backend, green-context partitions, CUDA graphs (run with `-m gpu`)."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from actors.config import CacheConfig, ModelArch, SchedulerConfig
from actors.disagg.frontend import DisaggLLM
from actors.disagg.transport import DeviceTransport
from actors.engine.frontend import LLM, CompletionOutput
from actors.kv.manager import pages_for
from actors.request import SamplingParams
from support import record_prefills, step_until

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
TIE = 2e-2  # logprob gap below which two kernels' rounding may pick either token


def _prompts(n: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = [3 + (37 * i) % 200 for i in range(n)]
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for length in lengths]


def _run(model: Path, prompts: list[list[int]], **kwargs: object) -> list[CompletionOutput]:
    with LLM(model, dtype="float16", cache=CacheConfig(num_pages=512),
             scheduler=SchedulerConfig(max_prefill_tokens=256, max_decode_seqs=64), **kwargs) as llm:
        return llm.generate(prompts, GREEDY)


def _divergences(reference: list[CompletionOutput], got: list[CompletionOutput]) -> list[tuple[int, int, float]]:
    """(prompt, step, reference logprob gap) where `got` first leaves the reference's greedy path.

    Fails if that step was not a numerical tie: both tokens in the reference's top-2 with
    logprobs within TIE of each other.
    """
    out = []
    for i, (ref, mine) in enumerate(zip(reference, got)):
        for j, (a, b) in enumerate(zip(ref.token_ids, mine.token_ids)):
            if a != b:
                top = dict(ref.logprobs[j].top)
                assert b in top, f"prompt {i} step {j}: token {b} not in the reference's top-2 {top}"
                gap = top[a] - top[b]
                assert gap < TIE, f"prompt {i} step {j}: not a tie (logprob gap {gap:.4f})"
                out.append((i, j, gap))
                break
    return out


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_flashinfer_matches_torch_backend_in_both_modes(model_factory: Callable[[str], Path], preset: str) -> None:
    """Greedy tokens equal the torch backend's, except where the reference itself had a tie."""
    model = model_factory(preset)
    prompts = _prompts(20, 512)
    reference = _run(model, prompts, mode="unified", attention_backend="torch", cuda_graphs=False)
    for mode in ("unified", "semi-pd"):
        got = _run(model, prompts, mode=mode, attention_backend="flashinfer")
        ties = _divergences(reference, got)
        assert len(ties) <= 2, f"{preset} {mode}: {len(ties)} of 20 prompts left the reference at ties: {ties}"


def test_a_prefill_held_to_a_launch_window_keeps_its_tokens(tiny_llama: Path) -> None:
    """With one decoder layer at most queued ahead of the prefill partition (`prefill_layers_ahead`), semi-PD's greedy
    tokens are those of prefills queued whole, but for ties; the prefill worker waited for its window."""
    prompts = _prompts(20, 512)
    reference = _run(tiny_llama, prompts, mode="semi-pd")
    with LLM(tiny_llama, dtype="float16", cache=CacheConfig(num_pages=512), mode="semi-pd", prefill_layers_ahead=1,
             scheduler=SchedulerConfig(max_prefill_tokens=256, max_decode_seqs=64)) as llm:
        got = llm.generate(prompts, GREEDY)
        prefill = llm.core.workers[0].runner
        assert prefill.window is not None and prefill.host_seconds["window"] > 0
        assert llm.core.workers[-1].runner.window is None  # decode's CUDA graphs are one launch each
    ties = _divergences(reference, got)
    assert len(ties) <= 2, f"{len(ties)} of 20 prompts left the reference at ties: {ties}"


@pytest.mark.parametrize("kernel", ["fa2", "fa3", "cuda-cores"])
def test_each_decode_kernel_matches_torch_backend_in_large_batches(model_factory: Callable[[str], Path],
                                                                  kernel: str) -> None:
    """Every decode kernel gives the torch backend's greedy tokens, in the CUDA-graph decode path (batches of
    40 down to 1, so graphs with and without split KV) and in mixed batches (unified mode)."""
    model = model_factory("tiny-llama")
    prompts = _prompts(40, 512)
    reference = _run(model, prompts, mode="unified", attention_backend="torch", cuda_graphs=False)
    got = _run(model, prompts, mode="unified", attention_backend="flashinfer", decode_attention=kernel)
    ties = _divergences(reference, got)
    assert len(ties) <= 4, f"{kernel}: {len(ties)} of 40 prompts left the reference at ties: {ties}"


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_shut_down_engine_gives_back_its_gpu_memory(model_factory: Callable[[str], Path], mode: str) -> None:
    """After `shutdown()` and the last reference, the KV pool, weights and graphs leave the GPU, so a
    second engine in the same process can size its cache (the engine benchmark once found -16 GiB).
    The cuBLAS workspaces torch cached for the engine's streams (32 MiB per thread and stream on
    Hopper; semi-PD has 26 streams on an H200) go at `shutdown()`."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    llm = LLM(model_factory("tiny-llama"), mode=mode, cache=CacheConfig(num_pages=8192),
              scheduler=SchedulerConfig(max_prefill_tokens=256, max_decode_seqs=64))
    llm.generate(_prompts(8, 512), GREEDY)
    pool = weakref.ref(llm.core.pool)
    pool_bytes = llm.core.pool.kv.numel() * llm.core.pool.kv.element_size()
    assert torch.cuda.memory_allocated() - before >= pool_bytes
    llm.shutdown()
    assert all(w.runner.graphs is None for w in llm.core.workers), "shutdown() kept CUDA graphs"
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    holders = [type(r).__name__ for r in gc.get_referrers(pool())] if pool() is not None else []
    assert pool() is None, f"the KV pool outlived its engine, held by {holders}"
    assert torch.cuda.memory_allocated() - before < pool_bytes // 8


def test_engine_start_warms_up_a_whole_token_budget_and_argmax_batches_keep_their_tokens(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up runs one iteration of the whole prefill budget (the engine's largest), in prompts no longer than the
    model allows; and batches that only take argmaxes, which sample from bf16 logits, draw the tokens that batches
    asking for logprobs (fp32 logits) draw."""
    from actors.runner.model_runner import ModelRunner

    iterations: list[tuple[int, ...]] = []
    execute = ModelRunner.execute

    def recorded(self: ModelRunner, plan: object, reqs: object) -> object:
        iterations.append(tuple(c.num_tokens for c in plan.chunks))  # type: ignore[attr-defined]
        return execute(self, plan, reqs)  # type: ignore[arg-type]

    monkeypatch.setattr(ModelRunner, "execute", recorded)
    budget = 1024
    with LLM(tiny_llama, mode="unified", dtype="bfloat16", cache=CacheConfig(num_pages=512),
             scheduler=SchedulerConfig(max_prefill_tokens=budget, max_model_len=300)) as llm:
        assert iterations[0] == (299, 299, 299, 127)
        prompts = [p[:64] for p in _prompts(8, llm.core.arch.vocab_size)]
        plain = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        llm.core.allocator.reset_prefix_cache()  # the same prompts again, computed again
        with_logprobs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                             logprobs=1))
    assert [o.token_ids for o in plain] == [o.token_ids for o in with_logprobs]


def test_serving_after_start_calls_no_cuda_host_alloc(tiny_llama: Path) -> None:
    """Every thread that stages copies has its pinned staging ring by the time a semi-PD engine has started (the
    warm-up's thread, and each worker's as `Worker.start` returns: `staging_ring`), and batches of 1 to 128
    sequences and prompts up to the prefill budget take their host buffers (inputs, attention plans, sampled
    tokens) from those rings: the CUDA programming guide counts a page-locked host allocation among the
    operations that keep two streams' commands from running concurrently, which would hold decode behind the
    prefill iteration in flight."""
    from actors.runner.transfer import pinned_host_allocs

    gen = torch.Generator().manual_seed(1)
    with LLM(tiny_llama, mode="semi-pd", cache=CacheConfig(num_pages=8192),
             scheduler=SchedulerConfig(max_prefill_tokens=4096, max_decode_seqs=128)) as llm:
        grown = pinned_host_allocs()
        assert grown > 0, "torch counts no cudaHostAlloc calls here (torch.cuda.host_memory_stats)"
        vocab = llm.core.arch.vocab_size
        for n, length in ((1, 2000), (2, 2000), (16, 300), (128, 60), (128, 250)):  # the tiny model's context: 2048
            prompts = [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]
            llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
        assert pinned_host_allocs() == grown, f"{pinned_host_allocs() - grown} cudaHostAlloc calls while serving"


def test_logit_bias_steers_graph_decodes_without_touching_their_batch_mates(tiny_llama: Path) -> None:
    """Requests with a logit bias (forcing a token, or banning the one greedy picks) share CUDA-graph, overlapped
    decode steps with plain greedy requests: the biased get their tokens, the plain ones the tokens they get alone
    (but where those had a tie, as batch size may change the GEMMs' rounding)."""
    prompts = _prompts(12, 512)
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with LLM(tiny_llama, mode="semi-pd", cache=CacheConfig(num_pages=512)) as llm:
        alone = llm.generate(prompts, replace(plain, logprobs=2))
        banned_first = [o.token_ids[0] for o in alone[6:]]
        params = ([SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logit_bias={11 + i: 100.0})
                   for i in range(3)]
                  + [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logit_bias={t: -100.0})
                     for t in banned_first[:3]]
                  + [plain] * 6)
        mixed = llm.generate(prompts[6:9] * 2 + prompts[:6], params)
    assert [o.token_ids for o in mixed[:3]] == [[11 + i] * 16 for i in range(3)]
    assert all(o.token_ids[0] != t and t not in o.token_ids for o, t in zip(mixed[3:6], banned_first))
    assert len(_divergences(alone[:6], mixed[6:])) <= 1


def test_structured_outputs_in_graph_decodes_beside_plain_requests(tiny_llama: Path) -> None:
    """Requests held to a regex, a choice and a JSON schema (the grammar's bitmask applied to the logits on the GPU)
    share CUDA-graph decode steps with plain greedy requests, queued ahead with their draws deferred until the step
    before has its tokens (the graph's output read after the next step was planned): the held ones match their
    grammar in both modes, the plain ones keep the tokens they get alone (but at a tie).
    llguidance comes with the staged vLLM on the GPU machine (`bench/device_env.sh`)."""
    pytest.importorskip("llguidance", reason="stage vLLM first: .vllmB carries llguidance (bench/device_env.sh)")
    import re

    from actors.request import StructuredOutputsParams as Structured

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
              "required": ["color", "ok"], "additionalProperties": False}
    held = [(Structured(regex=r"[a-c]{2,5}-[0-9]{2}"), lambda t: re.fullmatch(r"[a-c]{2,5}-[0-9]{2}", t)),
            (Structured(choice=["yes", "no way"]), lambda t: t in ("yes", "no way")),
            (Structured(json=schema, disable_any_whitespace=True),
             lambda t: set(json.loads(t)) == {"color", "ok"} and json.loads(t)["color"] in ("red", "green"))]
    prompts = _prompts(12, 512)
    plain = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    for mode in ("semi-pd", "unified"):
        with LLM(tiny_llama, mode=mode, cache=CacheConfig(num_pages=512)) as llm:
            alone = llm.generate(prompts[:6], replace(plain, logprobs=2))
            params = [plain] * 6 + [SamplingParams(max_tokens=48, temperature=t, seed=i, structured_outputs=spec)
                                    for i, (spec, _) in enumerate(held) for t in (0.0, 1.0)]
            mixed = llm.generate(prompts, params)
        for out, (_, matches) in zip(mixed[6:], [h for h in held for _ in range(2)]):
            assert out.finish_reason == "stop" and matches(out.text), (mode, out.text)
        assert len(_divergences(alone, mixed[:6])) <= 1, mode


def test_prompt_logprobs_on_the_gpu_match_the_torch_backend_across_chunks(model_factory: Callable[[str], Path]
                                                                          ) -> None:
    """Prompt logprobs scored on flashinfer's prefill in 64-token chunks, in both modes, equal the torch backend's
    within fp16 rounding."""
    model = model_factory("tiny-llama")
    prompts = [p for p in _prompts(12, 512) if len(p) > 70][:4]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2)

    def scored(**kwargs: object) -> list[list[float]]:
        with LLM(model, dtype="float16", cache=CacheConfig(num_pages=512),
                 scheduler=SchedulerConfig(max_prefill_tokens=64), **kwargs) as llm:
            outs = llm.generate(prompts, params)
        assert [[lp.token_id for lp in o.prompt_logprobs] for o in outs] == [p[1:] for p in prompts]
        return [[lp.logprob for lp in o.prompt_logprobs] for o in outs]

    reference = scored(mode="unified", attention_backend="torch", cuda_graphs=False)
    for mode in ("unified", "semi-pd"):
        got = scored(mode=mode, attention_backend="flashinfer")
        worst = max(abs(a - b) for r, g in zip(reference, got) for a, b in zip(r, g))
        assert worst < 0.05, f"{mode}: prompt logprobs differ by up to {worst:.4f}"


def test_staging_ring_reuses_a_region_only_after_its_copy_ran() -> None:
    """Host-to-device copies through a small pinned staging ring, queued behind a long sleep kernel so that none
    has run when the ring comes round, for several laps with no host wait of the test's own: every value lands
    as staged, so the ring waited for each region's copy before handing it out again (a region reused early
    lands a later copy's values). Then device-to-host copies read a few takes late, within one lap: intact."""
    from actors.runner.transfer import StagingRing

    capacity = 64 << 10
    ring = StagingRing(torch.empty(capacity, dtype=torch.uint8, pin_memory=True), torch.cuda.Event)
    stream, gen = torch.cuda.Stream(), torch.Generator().manual_seed(0)
    sent, landed = [], []
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles ahead of every copy below
        for _ in range(4 * capacity // 4096):  # 4 KiB each: four laps
            host = torch.randint(0, 1 << 30, (512,), generator=gen)
            staged = ring.take(host.shape, host.dtype)
            staged.copy_(host)
            landed.append(staged.to("cuda", non_blocking=True))
            ring.mark()
            sent.append(host)
        back = []
        for i, dev in enumerate(landed):
            returned = ring.take(dev.shape, dev.dtype)
            returned.copy_(dev, non_blocking=True)
            back.append((i, returned, ring.last_position, ring.mark()))
            if len(back) > 4:  # 5 x 4 KiB in flight, well within a 64 KiB lap
                j, out, position, done = back.pop(0)
                done.synchronize()
                assert ring.intact(position) and torch.equal(out, sent[j])
    torch.cuda.synchronize()
    assert all(torch.equal(dev.cpu(), host) for host, dev in zip(sent, landed))
    assert ring.oversized == 0


def test_flashinfer_first_uses_run_each_kernel_from_a_thread_of_their_own(tiny_llama: Path) -> None:
    """What an engine's start runs to build its kernels side by side: each first use returns the kernel's
    output, as the model's torch ops give it for the elementwise ones."""
    from actors.config import ModelArch
    from actors.models.ops import TorchOps
    from actors.runner.jit_warmup import flashinfer_first_uses, run_in_parallel

    arch, dev = ModelArch.from_dir(tiny_llama), torch.device("cuda")
    tasks = flashinfer_first_uses(arch, torch.float16, dev, "fa2")
    assert len(run_in_parallel(tasks)) == len(tasks) == 5
    norm, silu, rope, decode, prefill = (t() for t in tasks)
    for out in (decode, prefill):
        assert out.shape == (1, arch.num_heads, arch.head_dim) and bool(out.isfinite().all())

    def ones(*shape: int) -> torch.Tensor:
        return torch.ones(*shape, dtype=torch.float16, device=dev)

    h, d, ref = arch.hidden_size, arch.head_dim, TorchOps()
    cos_sin = torch.ones(2, d, dtype=torch.float32, device=dev)
    expected = (
        ref.add_rms_norm(ones(2, h), ones(2, h), ones(h), 1e-6),
        (ref.silu_and_mul(ones(2, 2 * arch.intermediate_size)),),
        ref.rotary(torch.arange(2, device=dev), ones(2, arch.num_heads, d), ones(2, arch.num_kv_heads, d), cos_sin),
    )
    for got, want in zip((norm, (silu,), rope), expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-2, rtol=1e-2)


def test_green_context_partitions_are_disjoint() -> None:
    from actors.engine.partitioner import GreenContextPartitioner

    device = torch.device("cuda")
    part = GreenContextPartitioner(device)
    total = part.total_sms
    for want, (got_prefill, got_decode) in part.actual_sms.items():
        assert got_prefill >= want and got_prefill % 8 == 0
        assert got_prefill + got_decode <= total
        assert got_decode >= 8
    streams = {p.stream.cuda_stream for p in part.all_partitions("prefill") + part.all_partitions("decode")}
    assert len(streams) == 2 * len(part.splits)


def test_kernels_stay_on_their_partition() -> None:
    """Record %smid from a kernel launched on each partition's stream: the sets must not overlap."""
    import triton
    import triton.language as tl

    from actors.engine.partitioner import GreenContextPartitioner

    @triton.jit
    def smid_kernel(out_ptr):  # type: ignore[no-untyped-def]
        pid = tl.program_id(0)
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(out_ptr + pid, sm)

    part = GreenContextPartitioner(torch.device("cuda"), splits=(32,))
    seen = {}
    for phase in ("prefill", "decode"):
        out = torch.full((4096,), -1, dtype=torch.int32, device="cuda")
        stream = part.partition_for(phase).stream
        with torch.cuda.stream(stream):
            smid_kernel[(4096,)](out)
        stream.synchronize()
        seen[phase] = set(out.tolist())
    assert -1 not in seen["prefill"] | seen["decode"]
    assert not seen["prefill"] & seen["decode"], "a prefill kernel ran on a decode SM"
    assert len(seen["prefill"]) <= part.actual_sms[32][0]


def test_cublas_sized_for_a_partition_per_thread() -> None:
    """A thread's cuBLAS handle takes its partition's SM count; GEMMs stay right, other threads keep theirs."""
    from concurrent.futures import ThreadPoolExecutor

    from actors.engine.partitioner import GreenContextPartitioner
    from actors.runner.cublas import set_sm_count_target, sm_count_target

    part = GreenContextPartitioner(torch.device("cuda"), splits=(112,)).partition_for("prefill")
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    expected = (a.float() @ b.float()).to(torch.bfloat16)
    torch.cuda.synchronize()
    try:
        with ThreadPoolExecutor(1) as pool:  # torch keeps one cuBLAS handle per thread
            assert pool.submit(lambda: (set_sm_count_target(64), sm_count_target())[1]).result() == 64
            set_sm_count_target(part.sms)
            assert sm_count_target() == part.sms
            assert pool.submit(sm_count_target).result() == 64
        with torch.cuda.stream(part.stream):
            got = a @ b
        part.stream.synchronize()
    finally:
        set_sm_count_target(torch.cuda.get_device_properties(0).multi_processor_count)
    assert sm_count_target() == 0
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=0.5)


def test_runner_moved_to_another_split_waits_for_its_work_on_the_old_one(tiny_llama: Path) -> None:
    """A prompt chunk that samples nothing is queued, not waited for; when the split changes before
    it ran, the runner's next iteration on the new split's stream must still come after it."""
    from cluster.bench.engine_bench import make_core

    core = make_core(str(tiny_llama), "semi-pd", dtype="bfloat16", cache=CacheConfig(num_pages=64))
    try:
        runner = core.workers[0].runner
        old, new = core.partitioner.all_partitions("prefill")[:2]
        assert old.stream is not None and new.stream is not None and old.stream != new.stream
        written = torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        runner.set_partition(old)
        with torch.cuda.stream(old.stream):
            torch.cuda._sleep(300_000_000)  # ~0.2 s of the old split's stream still busy
            written.fill_(1.0)
        runner.set_partition(new)
        with torch.cuda.stream(new.stream):
            seen = written.clone()
        new.stream.synchronize()  # green-context streams do not synchronize with the default one
        assert float(seen) == 1.0
    finally:
        core.shutdown()


def test_launches_queue_without_waiting_for_the_gpu(tiny_llama: Path) -> None:
    """A prefill and a decode launch on their partitions make no synchronizing CUDA call from our code
    (torch's sync debug mode); those inside libraries are printed with the Python stack that reached
    them, for the record, not failed."""
    from actors.request import Request
    from actors.scheduler.plan import BatchPlan, SeqChunk
    from cluster.bench.engine_bench import _decode_plan, _dummy_requests, make_core

    core = make_core(str(tiny_llama), "semi-pd", dtype="bfloat16", cache=CacheConfig(num_pages=512))
    try:
        prefill, decode = core.workers[0].runner, core.workers[-1].runner
        prefill.set_partition(core.partitioner.partition_for("prefill"))
        decode.set_partition(core.partitioner.partition_for("decode"))
        blocks = [core.allocator.allocate(20) for _ in range(2)]
        chunks = tuple(SeqChunk(f"p{i}", tuple(range(3, 303)), 0, tuple(b or ()), True) for i, b in enumerate(blocks))
        sampled = SamplingParams(max_tokens=64, temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, min_tokens=4)
        decode_plan = _decode_plan(core, 8, 200)[0]
        plans = {"prefill": (prefill, BatchPlan(prefills=chunks), _dummy_requests(2)),
                 "decode": (decode, decode_plan, _dummy_requests(8)),
                 "decode, sampled": (decode, decode_plan, [Request(f"s{i}", [1], 1, sampled) for i in range(8)])}
        for runner, plan, reqs in plans.values():
            runner.execute(plan, reqs)  # first use: kernels loaded, workspaces allocated
        torch.cuda.synchronize()
        ours_dir = f"{Path(__file__).resolve().parent.parent / 'actors'}/"
        syncs: dict[str, list[list[str]]] = {}
        for phase, (runner, plan, reqs) in plans.items():
            with _sync_stacks() as stacks:
                drawn = runner.launch(plan, reqs)
            drawn.result()
            syncs[phase] = stacks
            ours = [stack[-1] for stack in stacks if stack[-1].startswith(ours_dir)]
            assert not ours, f"{phase} launch synchronizes with the GPU at {ours}"
        for phase, stacks in syncs.items():
            print(f"synchronizing calls inside one {phase} launch: {len(stacks)}")
            for stack in stacks:
                print("  " + "\n    <- ".join(reversed(stack)))
    finally:
        core.shutdown()


@contextmanager
def _sync_stacks() -> Iterator[list[list[str]]]:
    """Torch's sync debug mode on; yields a list that collects, for each synchronizing call, the
    innermost frames of the Python stack that made it ("resolved path:line in function", outermost first)."""
    import traceback
    import warnings

    stacks: list[list[str]] = []
    armed = False  # the H200 run of 2026-12-03 saw one warning raised inside set_sync_debug_mode itself

    def record(message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: object) -> None:
        if armed and "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
            stacks.append([f"{Path(f.filename).resolve()}:{f.lineno} in {f.name}" for f in frames[-8:]])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        armed = True
        try:
            yield stacks
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _hf_state_dict(model: torch.nn.Module, arch: object) -> dict[str, torch.Tensor]:
    """Our fused weights as Hugging Face tensors (views, no copies)."""
    a = arch
    out = {}
    for name, p in model.named_parameters():
        if "qkv_proj" in name:
            q, k, v = p.split([a.q_size, a.kv_size, a.kv_size])  # type: ignore[attr-defined]
            for part, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[name.replace("qkv_proj", part)] = t
        elif "gate_up_proj" in name:
            gate, up = p.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj")] = gate
            out[name.replace("gate_up_proj", "up_proj")] = up
        else:
            out[name] = p
    return out


def test_llama3_8b_top1_agrees_with_transformers(tmp_path: Path) -> None:
    """32 greedy steps of 8 prompts: each of our tokens is transformers' top-1 at that position."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from actors.models.make_model import make_model

    model_dir = make_model("llama3-8b", tmp_path / "llama3-8b", weights=False)
    prompts = _prompts(8, 128256)
    steps = 32
    with LLM(model_dir, load_format="dummy", cache=CacheConfig(num_pages=4096)) as llm:
        ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, temperature=0.0,
                                                                           ignore_eos=True))]
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        hf.load_state_dict(_hf_state_dict(llm.core.model, llm.core.arch), assign=True, strict=False)
        hf.model.rotary_emb = LlamaRotaryEmbedding(config, device="cuda")
        hf.eval()
        exact, near = 0, []
        with torch.inference_mode():
            for prompt, out in zip(prompts, ours):
                ids = torch.tensor([prompt + out], device="cuda")
                logits = hf(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + steps].float()
                top = logits.argmax(-1).tolist()
                for step, (mine, theirs) in enumerate(zip(out, top)):
                    if mine == theirs:
                        exact += 1
                    else:
                        near.append(float(logits[step, theirs] - logits[step, mine]))
    total = len(prompts) * steps
    report = dict(exact=exact, total=total, mismatch_logit_gaps=near)
    Path(tmp_path / "agreement.json").write_text(json.dumps(report))
    print("llama3-8b agreement with transformers:", report)
    # bf16 logits over a 128K vocab of random weights are flat: top-2 gaps of a few bf16 ulps are common
    assert all(gap <= 0.5 for gap in near), f"our token is not a near-tie of transformers' top-1: {report}"
    assert exact >= 0.8 * total, report


STICKY_HANG_S = 90  # the sticky-error process dumps its threads' stacks to its log and exits after this


def _lose_the_gpu(model_dir: str, log_path: str) -> dict[str, object]:
    """In a process of its own (the CUDA context this poisons goes with it): prompt ids past the vocabulary
    reach the embedding kernel, whose device-side assert is a sticky CUDA error. The assert prints a line per
    failing GPU thread (megabytes), so this process's output goes to `log_path`, where a hang leaves the stacks
    of its threads."""
    import faulthandler
    import os

    from actors.engine.core import EngineDeadError

    log = open(log_path, "w")  # noqa: SIM115 - open until the process ends
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.dump_traceback_later(STICKY_HANG_S, exit=True, file=log)

    llm = LLM(model_dir, mode="semi-pd", dtype="bfloat16", cache=CacheConfig(num_pages=256), splits=(64,))
    told: list[BaseException] = []
    llm.core.on_device_lost = told.append
    runner = llm.core.workers[0].runner
    prepare = runner.prepare

    def poisoned(plan: object) -> tuple[object, ...]:
        input_ids, *rest = prepare(plan)  # type: ignore[arg-type]
        return (input_ids + llm.core.arch.vocab_size, *rest)

    runner.prepare = poisoned  # type: ignore[method-assign, assignment]
    outs = llm.generate([[1, 2, 3, 4]] * 3, SamplingParams(max_tokens=4, temperature=0.0))
    try:
        llm.generate([[5, 6]], SamplingParams(max_tokens=2))
        refused = ""
    except EngineDeadError as e:
        refused = str(e)
    return {"finish": [o.finish_reason for o in outs], "errors": [o.error or "" for o in outs],
            "told": [str(e) for e in told], "refused": refused}  # no shutdown: the device cannot sync any more


def test_a_sticky_cuda_error_ends_every_request_and_the_engine(tiny_llama: Path, tmp_path: Path) -> None:
    """A real sticky CUDA error (a device-side assert): the failed batch's requests end with an error that says
    so, the engine tells its owner once (a Ray actor then exits to be started again) and refuses new requests.
    Last in this file: its process may hang, and then takes STICKY_HANG_S."""
    import multiprocessing

    from cluster.bench.engine_bench import in_fresh_process

    log = tmp_path / "sticky.log"
    try:
        got = in_fresh_process(_lose_the_gpu, str(tiny_llama), str(log), timeout=STICKY_HANG_S + 30)
    except (RuntimeError, multiprocessing.TimeoutError) as e:
        pytest.fail(f"{e}; its log, without the device-side assert's lines:\n{_without_asserts(log)}")
    assert got["finish"] == ["error"] * 3 and all("CUDA error" in e for e in got["errors"]), got  # type: ignore[union-attr]
    assert len(got["told"]) == 1 and "CUDA error" in got["told"][0], got  # type: ignore[arg-type, index]
    assert "GPU failed" in got["refused"], got  # type: ignore[operator]




def _without_asserts(log: Path, keep: int = 80) -> str:
    """The last `keep` lines of `log` that are not a GPU thread's assert message."""
    if not log.exists():
        return "(no log)"
    with log.open(errors="replace") as f:
        lines = [line.rstrip() for line in f if "Assertion" not in line]
    return "\n".join(lines[-keep:])


def test_disagg_with_device_transport_matches_unified_flashinfer(tiny_llama: Path) -> None:
    """Prefill and decode both on cuda:0 with separate pools, KV copied on the transport's stream: the
    unified engine's greedy tokens (except where it had a numerical tie; batches differ), and exactly the
    prompts' pages moved."""
    prompts, page = _prompts(20, 256), 16
    common = dict(dtype="float16", attention_backend="flashinfer",
                  scheduler=SchedulerConfig(max_prefill_tokens=256, max_decode_seqs=64))
    with LLM(tiny_llama, mode="unified", cache=CacheConfig(page_size=page, num_pages=512), **common) as llm:
        reference = llm.generate(prompts, GREEDY)
    transport = DeviceTransport(torch.device("cuda"))
    with DisaggLLM(tiny_llama, transport=transport, prefill_cache=CacheConfig(page_size=page, num_pages=256),
                   decode_cache=CacheConfig(page_size=page, num_pages=512), **common) as llm:
        got = llm.generate(prompts, GREEDY)
        assert llm.pair.decode.num_preemptions == 0 and llm.pair.decode.num_imported == len(prompts)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in got)
    ties = _divergences(reference, got)
    assert len(ties) <= 2, f"{len(ties)} of {len(prompts)} prompts left the unified engine's tokens at ties: {ties}"
    a = ModelArch.from_dir(tiny_llama)
    per_page = a.num_layers * 2 * page * a.num_kv_heads * a.head_dim * 2  # fp16
    assert transport.bytes_moved == sum(pages_for(len(p), page) for p in prompts) * per_page


@pytest.mark.parametrize("mode", ["unified", "semi-pd"])
def test_requests_arriving_together_read_the_prefix_pages_one_of_them_writes_in_the_same_pass(
        tiny_llama: Path, mode: str) -> None:
    """flashinfer: requests admitted into one prefill iteration after one that computes their shared prefix (n > 1,
    chats sharing a system prompt) hit its pages and read their KV in that same forward pass, which writes every
    layer's new K/V into the pool before that layer's attention runs. Their tokens are those of the same burst with
    prefix caching off (but at ties)."""
    from types import SimpleNamespace

    from actors.config import EngineConfig
    from actors.engine.core import EngineCore
    from actors.request import TokenDelta

    gen = torch.Generator().manual_seed(2)
    system = torch.randint(0, 512, (100,), generator=gen).tolist()  # 6 full pages of 16 and 4 tokens
    tails = [torch.randint(0, 512, (20 + i,), generator=gen).tolist() for i in range(4)]
    prompts = [system + tails[0]] * 3 + [system + t for t in tails[1:]]

    def burst(prefix_caching: bool) -> tuple[list[tuple[int, int]], list[SimpleNamespace]]:
        """The first prefill iteration's chunks (start, tokens), and each request's tokens and logprobs."""
        deltas: list[TokenDelta] = []
        core = EngineCore(EngineConfig(model=str(tiny_llama), mode=mode, cache=CacheConfig(
            num_pages=512, enable_prefix_caching=prefix_caching), scheduler=SchedulerConfig(max_prefill_tokens=1024)),
            emit=deltas.extend)
        for w in core.workers:
            w._adopt_split()  # what each worker's loop does first: its partition's stream
        plans = record_prefills(core)
        for i, p in enumerate(prompts):
            core.add_request(f"r{i}", p, GREEDY)
        step_until(core, lambda: core.num_unfinished == 0)
        core.allocator.check_integrity()
        core.shutdown()
        outs = [SimpleNamespace(token_ids=[t for d in deltas if d.request_id == f"r{i}" for t in d.new_token_ids],
                                logprobs=[lp for d in deltas if d.request_id == f"r{i}" for lp in d.logprobs])
                for i in range(len(prompts))]
        return [(start, n) for _, start, n in plans[0]], outs

    shared, cold = burst(True), burst(False)
    siblings_hit = (len(prompts[0]) - 1) // 16 * 16
    assert shared[0] == [(0, len(prompts[0]))] + [(siblings_hit, len(prompts[0]) - siblings_hit)] * 2 + [
        (96, len(p) - 96) for p in prompts[3:]]
    assert cold[0] == [(0, len(p)) for p in prompts]
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in shared[1])
    assert len(_divergences(cold[1], shared[1])) <= 1
