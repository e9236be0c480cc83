"""One layer's GEMMs of the llama3-8b shape on green-context partitions, with cuBLAS sized for the
whole GPU (its default) and for the partition (`set_sm_count_target`).

    python3 bench/partition_gemm.py [OUT_JSON]

For each split, the prefill side runs M=4096 and M=1024 token GEMMs and the decode side M=64;
`ideal` is the whole GPU's time scaled by total/partition SMs (linear scaling). Prints a table
(last) and writes the rows as JSON. Last, it tries a 120/12 split (below the engine's
MIN_PARTITION_SMS), which ran no GEMM on its 12-SM side with cuBLAS sized for the whole GPU.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch

from actors.engine.partitioner import SM_GRANULE, GreenContextPartitioner, Partition
from actors.runner.cublas import set_sm_count_target, sm_count_target
from cluster.bench.engine_bench import _cuda_time

HIDDEN, INTERMEDIATE, QKV = 4096, 14336, 6144  # llama3-8b: 32 q + 2 x 8 kv heads of 128
SPLITS = (64, 80, 96, 112)


def _layer(m: int, device: torch.device) -> Callable[[], None]:
    """qkv, o, gate_up and down projections of one layer for `m` tokens."""
    bf16 = dict(dtype=torch.bfloat16, device=device)
    x = torch.randn(m, HIDDEN, **bf16)
    h = torch.randn(m, INTERMEDIATE, **bf16)
    weights = [torch.randn(n, k, **bf16) / k**0.5 for n, k in
               ((QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE))]

    def run() -> None:
        x @ weights[0].T
        x @ weights[1].T
        x @ weights[2].T
        h @ weights[3].T

    return run


def _time_ms(fn: Callable[[], None], stream: torch.cuda.Stream) -> float:
    with torch.cuda.stream(stream):
        return 1e3 * _cuda_time(fn, reps=20)


def _on(part: Partition, layer: Callable[[], None], sms: int) -> float:
    set_sm_count_target(sms)
    try:
        return _time_ms(layer, part.stream)  # type: ignore[arg-type]
    finally:
        set_sm_count_target(0)


def main(out_json: str | None) -> None:
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).multi_processor_count
    parts = GreenContextPartitioner(device, splits=SPLITS)
    set_sm_count_target(total)
    assert sm_count_target() == 0, "cuBLAS has no SM count target here: nothing to compare"
    layers = {m: _layer(m, device) for m in (64, 1024, 4096)}
    torch.cuda.synchronize()
    whole = {m: _time_ms(layer, torch.cuda.Stream(device)) for m, layer in layers.items()}
    rows = []
    for split in parts.splits:
        parts.switch(split)
        for phase, ms in (("prefill", (4096, 1024)), ("decode", (64,))):
            part = parts.partition_for(phase)
            for m in ms:
                default = _on(part, layers[m], total)
                sized = _on(part, layers[m], part.sms)
                ideal = whole[m] * total / part.sms
                rows.append(dict(split=split, phase=phase, sms=part.sms, tokens=m, whole_gpu_ms=whole[m],
                                 default_ms=default, sized_ms=sized, ideal_ms=ideal))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(device), total_sms=total, rows=rows), f, indent=1)
    print(f"One llama3-8b layer's GEMMs (qkv, o, gate_up, down), ms; {torch.cuda.get_device_name(device)}, {total} SMs")
    print("| split | phase | SMs | tokens | whole GPU | default | sized for partition | ideal (linear) | gain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['split']} | {r['phase']} | {r['sms']} | {r['tokens']} | {r['whole_gpu_ms']:.3f} | "
              f"{r['default_ms']:.3f} | {r['sized_ms']:.3f} | {r['ideal_ms']:.3f} | "
              f"{r['default_ms'] / r['sized_ms']:.2f}x |")
    print(probe_small_split(device))


def probe_small_split(device: torch.device, prefill_sms: int = 120) -> str:
    """Whether a split whose decode side is below MIN_PARTITION_SMS runs a decode-sized layer there."""
    try:
        parts = GreenContextPartitioner(device, splits=(prefill_sms,), min_sms=SM_GRANULE)
        part = parts.partition_for("decode")
        ms = _on(part, _layer(64, device), part.sms)
        return f"{prefill_sms}/{part.sms} split: the {part.sms}-SM side runs the layer's GEMMs (M=64) in {ms:.3f} ms"
    except Exception as e:  # the answer sought, not a failure of the benchmark
        return f"{prefill_sms}/x split: fails ({type(e).__name__}: {e})"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
