"""Attention backends, selected by name: `torch` (reference) and `flashinfer` (GPU)."""

from __future__ import annotations

from actors.attention.base import AttentionBackend, BatchLayout
from actors.config import ConfigError, ModelArch
from actors.kv.pool import KVPool

__all__ = ["AttentionBackend", "BatchLayout", "make_backend"]


def make_backend(name: str, pool: KVPool, arch: ModelArch, decode_kernel: str = "fa2") -> AttentionBackend:
    """`decode_kernel`: flashinfer's decode kernel (`EngineConfig.decode_attention`); the torch backend has one."""
    if name == "torch":
        from actors.attention.torch_backend import TorchAttention

        return TorchAttention(pool)
    if name == "flashinfer":
        from actors.attention.flashinfer_backend import FlashInferAttention

        return FlashInferAttention(pool, arch, decode_kernel)
    raise ConfigError(f"unknown attention backend {name!r} (choose torch or flashinfer)")
