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


def split_slots(slot_mapping: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool slots [T] -> (page ids, offsets in page), computed once per batch."""
    return slot_mapping // page_size, slot_mapping % page_size


def write_kv(pool: KVPool, layer_id: int, slots: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Store k/v [T, Hkv, D] into their (page, offset) slots of layer `layer_id`."""
    cache = pool.layer(layer_id)
    pages, offsets = slots
    cache[pages, 0, offsets] = k
    cache[pages, 1, offsets] = v
