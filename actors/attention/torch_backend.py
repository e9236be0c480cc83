"""Reference attention: gather each sequence's pages and run SDPA (CPU and GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.attention.base import AttentionBackend, BatchLayout, kv_rows, write_kv
from actors.models.llama import AttentionFn


class TorchAttention(AttentionBackend):
    name = "torch"

    def plan(self, layout: BatchLayout) -> AttentionFn:
        pool = self.pool
        device = layout.slot_mapping.device
        page_tables = [torch.tensor(t, dtype=torch.long, device=device) for t in layout.block_tables]
        masks = [_causal_mask(q, c, device) for q, c in zip(layout.query_lens, layout.context_lens)]
        rows = kv_rows(layout.slot_mapping, pool.page_size)

        def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
            write_kv(pool, layer_id, rows, k, v)
            cache = pool.layer(layer_id)
            out = torch.empty_like(q)
            group = q.shape[1] // k.shape[1]
            start = 0
            for qlen, ctx, pages, mask in zip(layout.query_lens, layout.context_lens, page_tables, masks):
                kv = cache[pages].transpose(0, 1).flatten(1, 2)[:, :ctx]  # [2, ctx, Hkv, D]
                keys = kv[0].transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, ctx, D]
                values = kv[1].transpose(0, 1).repeat_interleave(group, dim=0)
                query = q[start : start + qlen].transpose(0, 1)  # [Hq, qlen, D]
                o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
                out[start : start + qlen] = o.transpose(0, 1)
                start += qlen
            return out

        return attn


def _causal_mask(query_len: int, context_len: int, device: torch.device) -> torch.Tensor:
    """[q, ctx] bool: query j (at position ctx - q + j) sees keys at positions <= its own."""
    q_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    return torch.arange(context_len, device=device)[None, :] <= q_pos
