"""How long flashinfer's kernels for a model take to build side by side, as an engine's start builds them
(`actors.runner.jit_warmup`), on a machine without a kernel cache; then once more, built.

    python3 bench/jit_build_probe.py MODEL_DIR
"""

from __future__ import annotations

import sys
import time

import torch

from actors.config import ModelArch
from actors.runner.jit_warmup import flashinfer_first_uses, run_in_parallel
from cluster.cli import configure_logging

KERNELS = ("RMSNorm", "SiLU-and-mul", "RoPE", "decode attention", "prefill attention")  # flashinfer_first_uses' order


def main(model_dir: str) -> None:
    configure_logging("INFO")
    arch = ModelArch.from_dir(model_dir)
    rows = []
    for label in ("cold", "built"):
        t0 = time.perf_counter()
        each = run_in_parallel(flashinfer_first_uses(arch, torch.bfloat16, torch.device("cuda"), "fa2"))
        rows.append((label, time.perf_counter() - t0, each))
    print("| pass | all, side by side (s) | " + " | ".join(f"{k} (s)" for k in KERNELS) + " |")
    print("|---" * (len(KERNELS) + 2) + "|")
    for label, wall, each in rows:
        print(f"| {label} | {wall:.1f} | " + " | ".join(f"{s:.1f}" for s in each) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
