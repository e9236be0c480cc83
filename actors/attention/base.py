"""Attention backends: how a batch's paged attention is planned and run.

The model runner describes a batch with a `BatchLayout` (flat tokens; per-sequence
query lengths, context lengths and page tables); a backend turns it into an
`AttentionFn` that the model calls once per layer as `attn(q, k, v, layer_id)`. The
function writes the new k/v into the pool pages and attends over the whole context.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from actors.kv.pool import KVPool
from actors.models.llama import AttentionFn


@dataclass(frozen=True)
class BatchLayout:
    """One forward pass over `num_seqs` sequences, decodes (one query token) first.

    Tensors live on the compute device. `slot_mapping[t]` is the pool slot
    (page * page_size + offset) that token t's k/v go to.
    """

    num_decodes: int
    query_lens: tuple[int, ...]  # per sequence
    context_lens: tuple[int, ...]  # per sequence, including this step's tokens
    block_tables: tuple[tuple[int, ...], ...]  # per sequence
    slot_mapping: torch.Tensor  # [T] int64

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


class AttentionBackend(ABC):
    """Plans attention for a batch. One instance per worker (own workspace, own stream)."""

    name: str

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    @abstractmethod
    def plan(self, layout: BatchLayout) -> AttentionFn:
        """Return the per-layer attention function for this batch."""


def kv_rows(slot_mapping: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pool slots [T] -> [T, 2]: the rows of a layer's flattened cache ([pages * 2 * page_size, Hkv, D])
    that each token's k and v go to; computed once per batch."""
    k_rows = (slot_mapping // page_size) * (2 * page_size) + slot_mapping % page_size
    return torch.stack((k_rows, k_rows + page_size), dim=1)


def write_kv(pool: KVPool, layer_id: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k/v [T, Hkv, D] into the layer's cache rows `rows` [T, 2] (see `kv_rows`) with one kernel.

    The rows are copied as 8-byte words where their layout allows (a bit-exact copy): torch's indexing kernel
    moves one element per thread step, so 2-byte elements made it a quarter as fast."""
    cache = pool.layer(layer_id)
    dst, src = cache.view(-1, cache.shape[-2] * cache.shape[-1]), _kv_pair(k, v).flatten(2)
    if _viewable_as_words(dst) and _viewable_as_words(src):
        dst, src = dst.view(torch.int64), src.view(torch.int64)
    dst[rows] = src


def _viewable_as_words(t: torch.Tensor) -> bool:
    """Whether `t.view(torch.int64)` exists: whole 8-byte words along a unit-stride last dimension."""
    ratio = 8 // t.element_size()
    return (t.element_size() <= 8 and t.stride(-1) == 1 and t.shape[-1] % ratio == 0
            and all(s % ratio == 0 for s in t.stride()[:-1]) and t.storage_offset() % ratio == 0)


def _kv_pair(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[T, 2, Hkv, D]: a view when v follows k in memory row by row (slices of one fused QKV output), else a copy."""
    t, heads, dim = k.shape
    adjacent = (
        v.shape == k.shape and v.stride() == k.stride() and k.stride()[1:] == (dim, 1)
        and v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        and v.storage_offset() == k.storage_offset() + heads * dim
    )
    if adjacent:
        return k.as_strided((t, 2, heads, dim), (k.stride(0), heads * dim, dim, 1))
    return torch.stack((k, v), dim=1)
