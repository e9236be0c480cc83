"""flashinfer decode-attention kernels for the llama3-8b shape (32 q / 8 kv heads of 128, bf16), side by side.

    python3 bench/attention_decode.py [OUT_JSON]

Each variant is planned once per (page size, batch, context) and captured in a CUDA graph that runs it over
`RUNS` layer calls, rotating over `LAYERS` caches (together larger than L2) with pages in random order, as the
allocator hands them out; *us* is the replay time per layer call, *TB/s* the KV bytes read per call over it,
*of copy* that over the device's measured copy ceiling. The engine's decode runs `fa2-tc` at page size 16.
Prints a table (last) and writes the rows as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from cluster.bench.engine_bench import measure_ceilings

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
LAYERS, RUNS = 4, 32
BATCHES, CONTEXTS, PAGE_SIZES = (1, 32, 128, 256), (512, 2048), (16, 64)
# name -> (wrapper keyword arguments, plan keyword arguments)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "fa2-tc": (dict(use_tensor_cores=True), {}),
    "fa2-tc-nosplit": (dict(use_tensor_cores=True), dict(disable_split_kv=True)),
    "fa3-tc": (dict(use_tensor_cores=True, backend="fa3"), {}),
    "cuda-cores": (dict(use_tensor_cores=False), {}),
}


def _graph_ms(run: Callable[[], None], replays: int = 5) -> float:
    """Time (ms) of one `run`, captured in a CUDA graph and replayed."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def _measure(variant: str, caches: list[torch.Tensor], page_size: int, batch: int, ctx: int,
             workspace: torch.Tensor) -> float:
    """Microseconds per layer call of `variant`."""
    import flashinfer

    dev = caches[0].device
    wrapper_kw, plan_kw = VARIANTS[variant]
    pages_per_seq = -(-ctx // page_size)
    pages = torch.randperm(caches[0].shape[0], device=dev)[: batch * pages_per_seq].int()
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True,
        paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
        paged_kv_indices_buffer=torch.zeros(batch * pages_per_seq, dtype=torch.int32, device=dev),
        paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=dev), **wrapper_kw)
    indptr = torch.arange(batch + 1, dtype=torch.int32) * pages_per_seq
    last = torch.full((batch,), ctx - (pages_per_seq - 1) * page_size, dtype=torch.int32)
    wrapper.plan(indptr.pin_memory(), pages, last.pin_memory(), Q_HEADS, KV_HEADS, HEAD_DIM, page_size,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, **plan_kw)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)

    def run() -> None:
        for i in range(RUNS):
            wrapper.run(q, caches[i % LAYERS])

    return 1e3 * _graph_ms(run) / RUNS


def main(out_json: str | None) -> None:
    device = torch.device("cuda")
    copy_tbps = measure_ceilings(device).copy_bytes_per_s / 1e12
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
    rows: list[dict[str, Any]] = []
    for page_size in PAGE_SIZES:
        num_pages = max(BATCHES) * max(CONTEXTS) // page_size
        caches = [torch.randn(num_pages, 2, page_size, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
                  for _ in range(LAYERS)]
        for variant in VARIANTS:
            for batch in BATCHES:
                for ctx in CONTEXTS:
                    t0 = time.perf_counter()
                    row: dict[str, Any] = dict(variant=variant, page_size=page_size, batch=batch, context=ctx)
                    try:
                        us = _measure(variant, caches, page_size, batch, ctx, workspace)
                        tbps = batch * ctx * 2 * KV_HEADS * HEAD_DIM * 2 / (us * 1e-6) / 1e12
                        row.update(us=us, TBps=tbps, of_copy=tbps / copy_tbps)
                    except Exception as e:  # a variant the build or the device lacks: recorded, the rest go on
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    row["setup_s"] = time.perf_counter() - t0
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        del caches
        torch.cuda.empty_cache()
    if out_json:
        with open(out_json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(device), copy_TBps=copy_tbps, rows=rows), f, indent=1)
    print(format_table(rows))


def format_table(rows: list[dict[str, Any]]) -> str:
    """us per layer call (fraction of the copy ceiling), a column per variant."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| page | batch | ctx | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    by_shape: dict[tuple[int, int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_shape.setdefault((r["page_size"], r["batch"], r["context"]), {})[r["variant"]] = r
    for (ps, b, c), cells in by_shape.items():
        shown = [f"{cells[v]['us']:.1f} ({cells[v]['of_copy']:.0%})" if "us" in cells.get(v, {}) else "err"
                 for v in variants]
        lines.append(f"| {ps} | {b} | {c} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
