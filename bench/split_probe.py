"""Decode steps beside prefill on each split, against the latency profile's prediction (GPU machine).

    python3 bench/split_probe.py MODEL_DIR [--splits 56,64,72,80] [--batch 28] [--ctx 600] [--prompts 24]
                                           [--prompt-len 1024] [--profile bench/profiles/semipd-profile.json]
                                           [--json OUT.json]

On the H100 (serving's runs 37 and 38) every move of chat from 64 prefill SMs to 72 met a TPOT 10-25% over what
the profile predicted there, so the controller moved to a split whose TPOT it could not keep. The profile
measures 16, 32, ..., 112 (72 is fitted, not measured), each point the best of three beside a background loop of
the other phase that synchronizes after each iteration. This probe runs the engine's own workers instead: one
engine switched between `--splits`, decode `--batch` requests of `--ctx` prompt tokens back to back, prefill
`--prompts` prompts of `--prompt-len` tokens beside it (`bench_contention`), and prints per split the median
decode step beside prefill next to the profile's prediction for the batch's context, and prefill's tokens/s alone
and beside decode. Run 39 (H100, `serve-h100.md`): decode ran 3-11% under the profile on 56-80 prefill SMs, on 72
too, so serving's TPOT excess there is not the step's own time beside prefill.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from actors.slo.latency_model import LatencyModel, load_models
from cluster.bench.engine_bench import bench_contention
from cluster.bench.provenance import git_commit


def device_profile(path: str, device: str) -> LatencyModel:
    """The profile in `path` made on `device` (any split set)."""
    models = [m for m in load_models(path).values() if m.device == device]
    if not models:
        raise SystemExit(f"{path}: no profile for {device}")
    return models[0]


def with_prediction(row: dict[str, Any], model: LatencyModel) -> dict[str, Any]:
    """`row` with the profile's decode step beside prefill for its batch and context on its decode SMs, and
    measured / predicted; a row without decode steps (prefill alone) as it is."""
    if not row["decode_step_ms"]:
        return row
    predicted = model.decode_step_ms(row["decode_batch"], row["decode_context_tokens"],
                                     model.total_sms - row["prefill_sms"], concurrent=True)
    return {**row, "predicted_ms": predicted, "ratio": row["decode_step_ms"] / predicted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--splits", default="56,64,72,80", help="prefill SM counts, in the order measured")
    ap.add_argument("--batch", type=int, default=28, help="requests decoding (chat's batch on the H100: 24-30)")
    ap.add_argument("--ctx", type=int, default=600, help="prompt tokens of each decoding request")
    ap.add_argument("--prompts", type=int, default=24, help="prompts prefilled beside decode on each split")
    ap.add_argument("--prompt-len", type=int, default=1024, help="tokens of each of those prompts")
    ap.add_argument("--profile", default="bench/profiles/semipd-profile.json", help="the latency profile to compare")
    ap.add_argument("--json", help="also write the rows, with device, date, commit and command, to this file")
    args = ap.parse_args()
    splits = tuple(int(s) for s in args.splits.split(","))
    model = device_profile(args.profile, torch.cuda.get_device_name())
    rows = bench_contention(args.model_dir, splits, args.batch, (), prompts=args.prompts, prompt_len=args.prompt_len,
                            ctx=args.ctx)
    rows = [with_prediction(r, model) for r in rows]
    print("| prefill SMs | decode | batch | context | step ms | predicted ms | ratio | prefill tok/s | SM MHz |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        step = (f"{r['decode_step_ms']:.2f} | {r['predicted_ms']:.2f} | {r['ratio']:.3f}" if "ratio" in r
                else "- | - | -")
        clock = f"{r['sm_clock_mhz']:.0f}" if "sm_clock_mhz" in r else "-"
        print(f"| {r['prefill_sms']} | {r['decode']} | {r['decode_batch']} | {r['decode_context_tokens']} | {step} | "
              f"{r['prefill_tokens_per_s']:.0f} | {clock} |")
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    commit=git_commit(), command=" ".join(["python3", *sys.argv]), profile=model.key)
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
