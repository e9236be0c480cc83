"""CUDA graphs of the decode forward pass, per (SM partition stream, batch-size bucket).

A graph replays on the SMs of the green context it was captured in, so each split's
decode stream gets its own set. A batch of n decodes runs in the smallest bucket
>= n; padding rows decode token 0 at position 0 into the pool's scratch page.
All graphs share one memory pool; `release()` destroys them so that it can go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from actors.attention.base import BatchLayout, kv_rows
from actors.attention.flashinfer_backend import FlashInferAttention, GraphDecodeAttention
from actors.kv.pool import KVPool
from actors.models.llama import CausalLM
from actors.runner.cublas import graph_workspaces
from actors.runner.transfer import copy_to_device
from actors.scheduler.plan import SeqChunk

if TYPE_CHECKING:
    from actors.runner.model_runner import Carry

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


class DecodeGraphs:
    def __init__(self, model: CausalLM, backend: FlashInferAttention, pool: KVPool, max_batch: int,
                 max_pages_per_seq: int) -> None:
        self.model = model
        self.pool = pool
        self.buckets = tuple(b for b in BUCKETS if b <= max_batch) or (1,)
        top = self.buckets[-1]
        # rows: input ids, positions, KV slots, the cache rows of k and of v; one host->device copy per step
        self.inputs = torch.zeros(5, top, dtype=torch.long, device=pool.kv.device)
        self.input_ids, self.positions = self.inputs[0], self.inputs[1]
        self.attn = {bs: backend.graph_decoder(bs, max_pages_per_seq, self.inputs[3:5, :bs].T) for bs in self.buckets}
        self.mempool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _stage_inputs(self, chunks: tuple[SeqChunk, ...], bs: int) -> None:
        """Copy ids, positions and slots of `chunks` (padded to `bs`) into `self.inputs` in one transfer."""
        ps, n = self.pool.page_size, len(chunks)
        host = np.zeros((5, bs), dtype=np.int64)
        host[0, :n] = [c.token_ids[0] for c in chunks]
        host[1, :n] = [c.start for c in chunks]
        pages = np.full(bs, self.pool.scratch_page, dtype=np.int64)
        pages[:n] = [c.block_ids[c.start // ps] for c in chunks]
        host[2] = pages * ps + host[1] % ps
        host[3:5] = kv_rows(torch.from_numpy(host[2]), ps).T.numpy()
        copy_to_device(self.inputs[:, :bs], torch.from_numpy(host))

    def _prepare(self, chunks: tuple[SeqChunk, ...], bs: int) -> GraphDecodeAttention:
        self._stage_inputs(chunks, bs)
        scratch = self.pool.scratch_page
        layout = BatchLayout(
            num_decodes=bs,
            query_lens=(1,) * bs,
            context_lens=tuple(c.context_len for c in chunks) + (1,) * (bs - len(chunks)),
            block_tables=tuple(c.block_ids for c in chunks) + ((scratch,),) * (bs - len(chunks)),
            slot_mapping=self.inputs[2, :bs],
        )
        attn = self.attn[bs]
        attn.plan(layout)
        return attn

    def capture(self, stream: torch.cuda.Stream, bs: int) -> None:
        """Record the bucket's graph on `stream` (warming up eagerly there first).

        Captures with `capture_begin`/`capture_end` rather than `torch.cuda.graph`, whose
        entry runs `gc.collect()` and empties the allocator cache before every capture, and
        an engine captures one graph per (split, bucket). The captured GEMMs' cuBLAS
        workspace comes from the graph pool (`graph_workspaces`), so releasing torch's
        cached workspaces (at any engine's shutdown) cannot pull it from under the graph.
        """
        with torch.cuda.stream(stream):
            attn = self._prepare((), bs)
            self.model(self.input_ids[:bs], self.positions[:bs], attn)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with graph_workspaces():
                graph.capture_begin(pool=self.mempool, capture_error_mode="thread_local")
                try:
                    out = self.model(self.input_ids[:bs], self.positions[:bs], attn)
                finally:
                    graph.capture_end()
        self.graphs[(stream.cuda_stream, bs)] = (graph, out)

    def capture_all(self, stream: torch.cuda.Stream) -> None:
        for bs in reversed(self.buckets):
            self.capture(stream, bs)

    def release(self) -> None:
        """Destroy every graph and its output, so that the graph pool's memory can go back to the
        device; call once nothing replays them any more (a later `run` captures anew)."""
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def stage(self, chunks: tuple[SeqChunk, ...], stream: torch.cuda.Stream, carry: Carry | None = None
              ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Put the decode batch's inputs and attention plan in the graph's buffers on `stream` (capturing the
        bucket's graph first if `stream` has none); returns the graph to replay and its hidden states [n, H]."""
        bs = self.bucket(len(chunks))
        key = (stream.cuda_stream, bs)
        if key not in self.graphs:
            self.capture(stream, bs)
        self._prepare(chunks, bs)
        if carry is not None:
            carry.apply(self.input_ids)
        graph, out = self.graphs[key]
        return graph, out[: len(chunks)]
