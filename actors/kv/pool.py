"""The KV pool: one tensor of pages for all layers, shared by both workers."""

from __future__ import annotations

import torch

from actors.config import ModelArch


class KVPool:
    """Pages of `page_size` token slots: `kv[layer]` is [num_pages, 2, page_size, Hkv, D].

    Layer slices are contiguous and in flashinfer's NHD paged layout, so attention
    backends read and write them in place. One extra page, `scratch_page`, is never
    allocated: padding rows of CUDA-graph batches write there.
    """

    def __init__(self, arch: ModelArch, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.scratch_page = num_pages
        self.kv = torch.zeros(
            arch.num_layers, num_pages + 1, 2, page_size, arch.num_kv_heads, arch.head_dim, dtype=dtype, device=device
        )

    def layer(self, layer_id: int) -> torch.Tensor:
        return self.kv[layer_id]

    @staticmethod
    def bytes_per_page(arch: ModelArch, page_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return arch.num_layers * 2 * page_size * arch.num_kv_heads * arch.head_dim * elem
