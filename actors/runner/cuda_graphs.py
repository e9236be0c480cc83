"""CUDA graphs of the decode forward pass, per (SM partition stream, batch-size bucket).

A graph replays on the SMs of the green context it was captured in, so each split's
decode stream gets its own set. A batch of n decodes runs in the smallest bucket
>= n; padding rows decode token 0 at position 0 into the pool's scratch page.
"""

from __future__ import annotations

import torch

from actors.attention.base import BatchLayout
from actors.attention.flashinfer_backend import FlashInferAttention, GraphDecodeAttention
from actors.kv.pool import KVPool
from actors.models.llama import CausalLM
from actors.scheduler.plan import SeqChunk

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


class DecodeGraphs:
    def __init__(self, model: CausalLM, backend: FlashInferAttention, pool: KVPool, max_batch: int,
                 max_pages_per_seq: int) -> None:
        self.model = model
        self.pool = pool
        self.buckets = tuple(b for b in BUCKETS if b <= max_batch) or (1,)
        dev = pool.kv.device
        top = self.buckets[-1]
        self.input_ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.attn = {bs: backend.graph_decoder(bs, max_pages_per_seq) for bs in self.buckets}
        self.mempool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _padded_layout(self, chunks: tuple[SeqChunk, ...], bs: int) -> tuple[list[int], list[int], BatchLayout]:
        ps = self.pool.page_size
        scratch = self.pool.scratch_page
        ids = [c.token_ids[0] for c in chunks] + [0] * (bs - len(chunks))
        pos = [c.start for c in chunks] + [0] * (bs - len(chunks))
        slots = [c.block_ids[c.start // ps] * ps + c.start % ps for c in chunks] + [scratch * ps] * (bs - len(chunks))
        layout = BatchLayout(
            num_decodes=bs,
            query_lens=(1,) * bs,
            context_lens=tuple(c.context_len for c in chunks) + (1,) * (bs - len(chunks)),
            block_tables=tuple(c.block_ids for c in chunks) + ((scratch,),) * (bs - len(chunks)),
            slot_mapping=torch.tensor(slots, dtype=torch.long).pin_memory().to(self.pool.kv.device, non_blocking=True),
        )
        return ids, pos, layout

    def _prepare(self, chunks: tuple[SeqChunk, ...], bs: int) -> GraphDecodeAttention:
        ids, pos, layout = self._padded_layout(chunks, bs)
        dev = self.pool.kv.device
        self.input_ids[:bs].copy_(torch.tensor(ids).pin_memory().to(dev, non_blocking=True))
        self.positions[:bs].copy_(torch.tensor(pos).pin_memory().to(dev, non_blocking=True))
        attn = self.attn[bs]
        attn.plan(layout)
        return attn

    def capture(self, stream: torch.cuda.Stream, bs: int) -> None:
        """Record the bucket's graph on `stream` (warming up eagerly there first)."""
        with torch.cuda.stream(stream):
            attn = self._prepare((), bs)
            self.model(self.input_ids[:bs], self.positions[:bs], attn)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool, stream=stream, capture_error_mode="thread_local"):
            out = self.model(self.input_ids[:bs], self.positions[:bs], attn)
        self.graphs[(stream.cuda_stream, bs)] = (graph, out)

    def capture_all(self, stream: torch.cuda.Stream) -> None:
        for bs in reversed(self.buckets):
            self.capture(stream, bs)

    def run(self, chunks: tuple[SeqChunk, ...], stream: torch.cuda.Stream) -> torch.Tensor:
        """Hidden states [n, H] of the decode batch, by graph replay on `stream`."""
        bs = self.bucket(len(chunks))
        key = (stream.cuda_stream, bs)
        if key not in self.graphs:
            self.capture(stream, bs)
        self._prepare(chunks, bs)
        graph, out = self.graphs[key]
        graph.replay()
        return out[: len(chunks)]
