"""flashinfer paged attention (GPU): a prefill and a decode wrapper per worker.

A batch's decode sequences (one query token each) go through
`BatchDecodeWithPagedKVCacheWrapper`, its prefill chunks (with any cached context)
through `BatchPrefillWithPagedKVCacheWrapper` (causal). New k/v are written straight
into the pool pages by slot. `GraphDecodeAttention` is the decode path with fixed
buffers for one CUDA-graph batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from actors.attention.base import AttentionBackend, BatchLayout, kv_rows, write_kv
from actors.config import ModelArch
from actors.kv.pool import KVPool
from actors.models.llama import AttentionFn
from actors.runner.transfer import staging_ring, to_device

WORKSPACE_BYTES = 256 << 20
# `EngineConfig.decode_attention` -> flashinfer decode-wrapper options. Tensor-core fa2 was measured faster than
# the CUDA-core kernel on an H100 for Llama-3-8B (group 4) at long contexts (batch 128 x 2048: 22.0 ms vs 23.9 ms
# per step) and equal at short ones.
DECODE_WRAPPER_OPTIONS: dict[str, dict[str, object]] = {
    "fa2": dict(use_tensor_cores=True, backend="fa2"),
    "fa3": dict(use_tensor_cores=True, backend="fa3"),
    "cuda-cores": dict(use_tensor_cores=False),
}


def _paged_indices(block_tables: tuple[tuple[int, ...], ...], context_lens: tuple[int, ...], page_size: int
                   ) -> tuple[list[int], list[int], list[int]]:
    """CSR page table (indptr, indices) and last-page fill per sequence.

    flashinfer's kernels take a sequence's length from its page count and last-page fill
    unchecked: a sequence without context, or with fewer pages than its context needs, would
    read outside the pool, a sticky CUDA error that ends the process with every request in it.
    Such a table raises `ValueError` here instead, which fails only the batch. (Page ids come
    from the allocator, which hands out none outside the pool.)
    """
    indptr, indices, last = [0], [], []
    for i, (table, ctx) in enumerate(zip(block_tables, context_lens)):
        n = -(-ctx // page_size)
        if ctx < 1 or len(table) < n:
            raise ValueError(f"sequence {i} of the batch has {len(table)} pages for a context of {ctx} tokens "
                             f"(page size {page_size})")
        indices.extend(table[:n])
        indptr.append(len(indices))
        last.append(ctx - (n - 1) * page_size)
    return indptr, indices, last


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"

    def __init__(self, pool: KVPool, arch: ModelArch, decode_kernel: str = "fa2") -> None:
        """`decode_kernel`: a key of `DECODE_WRAPPER_OPTIONS` (validated by `EngineConfig`)."""
        super().__init__(pool)
        import flashinfer

        self.arch = arch
        self.device = pool.kv.device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode_options = DECODE_WRAPPER_OPTIONS[decode_kernel]
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", **self.decode_options)
        self.dtype = pool.kv.dtype
        self._plan_copied: dict[int, torch.cuda.Event] = {}  # wrapper id -> its last plan's copy to the device

    @staticmethod
    def _i32(values: list[int]) -> torch.Tensor:
        """Host int32 in the thread's pinned staging ring: flashinfer's planners read indptr and lengths on the
        host, so device ones would cost a device-to-host copy and a sync each; `plan()` queues their copies to
        the device. Take them inside `_planning`, whose mark covers them, with no other mark in between (no
        `to_device`)."""
        return staging_ring().stage(torch.tensor(values, dtype=torch.int32))

    @contextmanager
    def _planning(self, wrapper: object) -> Iterator[None]:
        """Around one `wrapper.plan()`: flashinfer writes a plan into one pinned host buffer per
        wrapper and queues its copy to the device; the next plan must not overwrite that buffer
        before the copy ran. With overlapped decode the next plan comes while the step that uses
        the previous one is still queued, so wait (on the host) for that copy, which is quick.
        The staging ring's mark after `plan()` is that event, and covers the plan's `_i32` inputs."""
        previous = self._plan_copied.get(id(wrapper))
        if previous is not None:
            previous.synchronize()
        try:
            yield
        finally:
            self._plan_copied[id(wrapper)] = staging_ring().mark(torch.cuda.current_stream(self.device))

    def _plan_decode(self, wrapper: object, layout: BatchLayout, lo: int, hi: int, split_kv: bool = True) -> None:
        """indptr and last-page lengths go in on the host, where flashinfer's planner reads them; the page
        indices on the device: a CUDA-graph wrapper copies host indices into its buffer with a blocking
        copy, which would wait for the decode step still queued on the stream (overlapped decode).
        `split_kv` False: one CTA per sequence and kv head, no merge (see `GraphDecodeAttention`)."""
        indptr, indices, last = _paged_indices(layout.block_tables[lo:hi], layout.context_lens[lo:hi],
                                               self.pool.page_size)
        indices_on_device = to_device(indices, torch.int32, self.device)  # it marks: not inside `_planning`
        a = self.arch
        with self._planning(wrapper):
            wrapper.plan(  # type: ignore[attr-defined]
                self._i32(indptr), indices_on_device, self._i32(last),
                a.num_heads, a.num_kv_heads, a.head_dim, self.pool.page_size, q_data_type=self.dtype,
                kv_data_type=self.dtype, disable_split_kv=not split_kv,
            )

    def _plan_prefill(self, layout: BatchLayout, lo: int) -> None:
        qlens = layout.query_lens[lo:]
        qo_indptr = [0]
        for n in qlens:
            qo_indptr.append(qo_indptr[-1] + n)
        indptr, indices, last = _paged_indices(layout.block_tables[lo:], layout.context_lens[lo:], self.pool.page_size)
        a = self.arch
        with self._planning(self._prefill):
            self._prefill.plan(
                self._i32(qo_indptr), self._i32(indptr), self._i32(indices), self._i32(last),
                a.num_heads, a.num_kv_heads, a.head_dim, self.pool.page_size, causal=True,
                q_data_type=self.dtype, kv_data_type=self.dtype,
            )

    def plan(self, layout: BatchLayout) -> AttentionFn:
        nd, n = layout.num_decodes, layout.num_seqs
        if nd:
            self._plan_decode(self._decode, layout, 0, nd)
        if nd < n:
            self._plan_prefill(layout, nd)
        pool, decode, prefill = self.pool, self._decode, self._prefill
        rows = kv_rows(layout.slot_mapping, pool.page_size)

        def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
            write_kv(pool, layer_id, rows, k, v)
            cache = pool.layer(layer_id)
            if nd == n:
                return decode.run(q, cache)
            out = torch.empty_like(q)  # given: the prefill wrapper zero-fills one it makes, and no cat of the parts
            if nd:
                decode.run(q[:nd], cache, out=out[:nd])
            prefill.run(q[nd:], cache, out=out[nd:])
            return out

        return attn

    def graph_decoder(self, batch_size: int, max_pages_per_seq: int, rows: torch.Tensor) -> GraphDecodeAttention:
        return GraphDecodeAttention(self, batch_size, max_pages_per_seq, rows)


class GraphDecodeAttention:
    """Decode attention for exactly `batch_size` sequences with fixed device buffers.

    `plan(layout)` refreshes flashinfer's buffers in place (before each replay); the caller
    owns `rows` [batch_size, 2] (the cache rows this step's k/v go to, see `kv_rows`) and fills them
    before replay. The captured graph calls the instance as the model's `attn`.

    Under a CUDA graph, flashinfer's split-KV decode always runs its merge kernel over a grid padded for the
    worst case. From `NO_SPLIT_MIN_BATCH` sequences on, one CTA per sequence and kv head keeps the SMs busy
    on its own, and the unsplit kernel was faster at every context measured (H200, 2026-12-03,
    `bench/attention_decode.py`: batch 32 / 128 / 256 at context 512, 24.2 / 77.3 / 140.7 us per layer
    against 26.9 / 82.6 / 148.7 split; batch 1 unsplit took 12.1 against 9.5).
    """

    NO_SPLIT_MIN_BATCH = 32

    def __init__(self, backend: FlashInferAttention, batch_size: int, max_pages_per_seq: int,
                 rows: torch.Tensor) -> None:
        import flashinfer

        dev = backend.device
        self.backend = backend
        self.batch_size = batch_size
        self.rows = rows
        self._wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            backend.workspace, "NHD", use_cuda_graph=True, **backend.decode_options,
            paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(batch_size * max_pages_per_seq, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.zeros(batch_size, dtype=torch.int32, device=dev),
        )

    def plan(self, layout: BatchLayout) -> None:
        assert layout.num_seqs == self.batch_size == layout.num_decodes
        self.backend._plan_decode(self._wrapper, layout, 0, self.batch_size,
                                  split_kv=self.batch_size < self.NO_SPLIT_MIN_BATCH)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        pool = self.backend.pool
        write_kv(pool, layer_id, self.rows, k, v)
        return self._wrapper.run(q, pool.layer(layer_id))


def attention_first_uses(arch: ModelArch, dtype: torch.dtype, device: torch.device, decode_kernel: str
                         ) -> list[Callable[[], object]]:
    """A decode and a prefill of one token, each through a backend of its own over a one-page pool, for
    `actors.runner.jit_warmup`: the two build different kernel modules (the decode's as `decode_kernel` makes it,
    the prefill's as flashinfer picks it for the device: fa3 on Hopper)."""
    def attend(num_decodes: int) -> Callable[[], object]:
        def run() -> object:
            pool = KVPool(arch, 1, 16, dtype, device)
            layout = BatchLayout(num_decodes, (1,), (1,), ((0,),), torch.zeros(1, dtype=torch.int64, device=device))
            q = torch.zeros(1, arch.num_heads, arch.head_dim, dtype=dtype, device=device)
            kv = torch.zeros(1, arch.num_kv_heads, arch.head_dim, dtype=dtype, device=device)
            return FlashInferAttention(pool, arch, decode_kernel).plan(layout)(q, kv, kv, 0)

        return run

    return [attend(1), attend(0)]
