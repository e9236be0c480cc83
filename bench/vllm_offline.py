"""vLLM reference for the offline job and the decode step:

    vllm-python bench/vllm_offline.py MODEL_DIR OUT.json [PROFILE_DIR]

Same prompts (cluster.bench.offline_job), same shape (random weights via load_format=dummy). Like our engine
benchmark, the timed run starts from an empty prefix cache (the warm-up's prompts are the job's first ones).
Then vLLM's decode step at the batches and contexts of our engine benchmark's decode table (`decode_steps`).
With PROFILE_DIR, the job then runs once more under vLLM's torch profiler (its worker writes the trace there),
and the kernel tables of `cluster.bench.kernel_time` are printed last, to set beside `bench/offline_profile.py`'s.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.bench.kernel_time import chrome_trace_kernels, report  # noqa: E402
from cluster.bench.offline_job import DECODE_BATCHES, DECODE_CONTEXTS, JOB, offline_prompts  # noqa: E402
from cluster.bench.telemetry import GpuTelemetry  # noqa: E402

TRACE_WAIT_S = 120.0
DECODE_STEPS = 64


def main(model_dir: str, out_path: str, profile_dir: str | None = None) -> None:
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in offline_prompts(vocab)]
    profiler = None if profile_dir is None else dict(
        profiler="torch", torch_profiler_dir=str(Path(profile_dir).resolve()), torch_profiler_with_stack=False)
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=4096, gpu_memory_utilization=0.85, profiler_config=profiler)
    params = SamplingParams(max_tokens=JOB.output_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:8], params, use_tqdm=False)
    llm.reset_prefix_cache()
    with GpuTelemetry() as telemetry:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    result = dict(version=vllm.__version__, seconds=dt, output_tokens=generated, output_tokens_per_s=generated / dt,
                  total_tokens_per_s=(generated + prompt_tokens) / dt, prefix_cache_reset=True,
                  gpu=telemetry.summary())
    result["decode"] = decode_steps(llm, vocab)
    Path(out_path).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    if profile_dir is not None:
        print("\n" + profile_job(llm, prompts, params, Path(profile_dir)))


def decode_steps(llm: Any, vocab: int) -> list[dict[str, Any]]:
    """vLLM's decode step (ms) for `batch` requests at `context` tokens, each batch and context of the constants.

    The prompts are prefilled once (one output token), so that the two timed runs find them in the prefix cache:
    one generates 1 token, one 1 + DECODE_STEPS; the step is their difference over DECODE_STEPS (the best of
    two tries each): vLLM's own engine loop with its scheduling and sampling, without the prefill, at a context
    from `context` to `context` + DECODE_STEPS."""
    from vllm import SamplingParams, TokensPrompt

    def timed(prompts: list[Any], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - t0)
        return best

    rows = []
    for context in DECODE_CONTEXTS:
        for batch in DECODE_BATCHES:
            rng = random.Random(batch * 1_000_003 + context)
            prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(vocab) for _ in range(context)])
                       for _ in range(batch)]
            llm.reset_prefix_cache()
            timed(prompts, 1)  # prefills them into the cache
            step_s = (timed(prompts, 1 + DECODE_STEPS) - timed(prompts, 1)) / DECODE_STEPS
            rows.append(dict(batch=batch, context=context, step_ms=step_s * 1e3))
            print(f"vLLM decode: batch {batch}, context {context}: {step_s * 1e3:.2f} ms per step", flush=True)
    return rows


def profile_job(llm: Any, prompts: list[Any], params: Any, trace_dir: Path) -> str:
    """The job once more under vLLM's profiler (`llm`: a `vllm.LLM` made with a torch profiler config); its kernel
    tables."""
    llm.reset_prefix_cache()
    llm.start_profile()
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    llm.stop_profile()
    trace = _written_trace(trace_dir)
    return f"profiled job: {wall:.2f} s; trace {trace.name}\n\n" + report(chrome_trace_kernels(trace), wall)


def _written_trace(trace_dir: Path) -> Path:
    """The largest trace file in `trace_dir` (the GPU worker's), once its size has stopped changing."""
    deadline = time.monotonic() + TRACE_WAIT_S
    last_size = -1
    while time.monotonic() < deadline:
        traces = sorted(trace_dir.glob("*.pt.trace.json*"), key=lambda p: p.stat().st_size)
        if traces and traces[-1].stat().st_size == last_size and last_size > 0:
            return traces[-1]
        last_size = traces[-1].stat().st_size if traces else -1
        time.sleep(1.0)
    raise TimeoutError(f"no finished trace in {trace_dir} after {TRACE_WAIT_S:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:4])
