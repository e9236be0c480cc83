"""Whether decode stands still on a fresh semi-PD engine's first load, with and without the warm-up's draws.

    python3 bench/stall_probe.py MODEL_DIR [--waves 8] [--gap-s 0.25] [--requests 256]

On the H100 (serving's run 30) a fresh server's first windows at a new load had decode stand still for 100-280 ms
at a time while prefill iterations spent 3-16 ms in their draws (0.2 once warm). The suspicion: kernels loaded at
their first use (the LM head's GEMM and the sampler, run outside the CUDA graphs with one row per sequence that
samples), which the engine's warm-up did not meet, as it sampled one or two rows; 6426c4e added draws of every row
count to the warm-up. Each arm builds an engine in a fresh process (a process loads a kernel once), one arm with
the warm-up's draws left out, and sends the offline job's prompts in waves so that prefill runs beside a growing
decode batch; it prints the engine's start-up time, decode's iterations over 100 ms and its longest, and the host
time of prefill's draws.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from cluster.bench.engine_bench import in_fresh_process
from cluster.bench.offline_job import JOB, OfflineJob, offline_prompts


def run_arm(model_dir: str, draws: bool, waves: int, gap_s: float, requests: int) -> dict[str, Any]:
    """One fresh engine's first load; `draws` False leaves the warm-up's draws out."""
    from actors.engine.frontend import LLM
    from actors.request import SamplingParams
    from actors.runner.model_runner import ModelRunner

    if not draws:
        ModelRunner.warm_up_draws = lambda self, greedy_rows, sampled_rows: None  # type: ignore[method-assign]
    t0 = time.perf_counter()
    llm = LLM(model_dir, mode="semi-pd", load_format="dummy")
    start_s = time.perf_counter() - t0
    prompts = offline_prompts(llm.core.arch.vocab_size, OfflineJob(num_requests=requests))
    params = SamplingParams(max_tokens=JOB.output_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    size = -(-len(prompts) // waves)
    senders = [threading.Thread(target=llm.generate, args=(prompts[i:i + size], params))
               for i in range(0, len(prompts), size)]
    prefill = next(w for w in llm.core.workers if w.name == "prefill")
    since, drawn_s, iterations = time.monotonic(), prefill.runner.host_seconds["sample"], prefill.iterations
    for sender in senders:  # waves of arrivals: each wave's prompts prefill beside the earlier ones' decodes
        sender.start()
        time.sleep(gap_s)
    for sender in senders:
        sender.join()
    decode_worker = next(w for w in llm.core.workers if w.name == "decode")
    decode = [it.seconds for it in list(decode_worker.iteration_log) if it.start >= since]
    row = dict(draws=draws, start_s=start_s, decode_steps=len(decode),
               over_100ms=sum(1 for s in decode if s > 0.1), longest_ms=1e3 * max(decode, default=0.0),
               prefill_draw_ms=1e3 * (prefill.runner.host_seconds["sample"] - drawn_s)
               / max(1, prefill.iterations - iterations))
    llm.shutdown()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--waves", type=int, default=8, help="waves the offline job's prompts arrive in (default 8)")
    parser.add_argument("--gap-s", type=float, default=0.25, help="seconds between waves (default 0.25)")
    parser.add_argument("--requests", type=int, default=JOB.num_requests,
                        help=f"the offline job's first N prompts (default {JOB.num_requests}; fewer for a CPU check)")
    args = parser.parse_args()
    rows = [in_fresh_process(run_arm, args.model_dir, draws, args.waves, args.gap_s, args.requests, timeout=600)
            for draws in (False, True)]
    print("| warm-up draws | engine start (s) | decode steps | over 100 ms | longest (ms) "
          "| prefill draw host (ms/iter) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'yes' if r['draws'] else 'no'} | {r['start_s']:.1f} | {r['decode_steps']} | {r['over_100ms']} | "
              f"{r['longest_ms']:.0f} | {r['prefill_draw_ms']:.2f} |")


if __name__ == "__main__":
    main()
