"""How long flashinfer's kernels for a model take to build side by side, as an engine's start builds them
(`actors.runner.jit_warmup`), on a machine without a kernel cache; then once more, built.

    python3 bench/jit_build_probe.py MODEL_DIR

Beside the model's bf16 kernels it builds the fp16 attention kernels the GPU tests' tiny models use (the same
head dimension, 128): built here side by side, they cost the tests' call nothing (H200, run 22: the tests spent
their whole 250 s call building them one test at a time, and pytest's report was lost).
"""

from __future__ import annotations

import sys
import time

import torch

from actors.attention.flashinfer_backend import attention_first_uses
from actors.config import ModelArch
from actors.runner.jit_warmup import flashinfer_first_uses, on_device, run_in_parallel
from cluster.cli import configure_logging

# flashinfer_first_uses' order, then attention_first_uses' for the tests' dtype
KERNELS = ("RMSNorm", "SiLU-and-mul", "RoPE", "decode attention", "prefill attention", "decode attention fp16",
           "prefill attention fp16")


def main(model_dir: str) -> None:
    configure_logging("INFO")
    arch = ModelArch.from_dir(model_dir)
    rows = []
    for label in ("cold", "built"):
        t0 = time.perf_counter()
        dev = torch.device("cuda")
        tests_attention = [on_device(dev, use) for use in attention_first_uses(arch, torch.float16, dev, "fa2")]
        each = run_in_parallel(flashinfer_first_uses(arch, torch.bfloat16, dev, "fa2") + tests_attention)
        rows.append((label, time.perf_counter() - t0, each))
    print("| pass | all, side by side (s) | " + " | ".join(f"{k} (s)" for k in KERNELS) + " |")
    print("|---" * (len(KERNELS) + 2) + "|")
    for label, wall, each in rows:
        print(f"| {label} | {wall:.1f} | " + " | ".join(f"{s:.1f}" for s in each) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
