"""The few elementwise ops of the model, behind one small interface.

`TorchOps` is the reference (Hugging Face's numerics, any device). `FlashInferOps`
fuses them into single kernels on the GPU (RMSNorm with the residual add, SiLU-and-mul,
in-place RoPE from a cos/sin cache): a decode step of a 32-layer model launches about
a thousand fewer kernels, which is most of the gap to the memory roofline at small
batch. Both take and return the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from actors.config import ModelArch


class TorchOps:
    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., D] -> normalized x (fp32 statistics, weight applied in x's dtype)."""
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2I] -> silu(x[:, :I]) * x[:, I:]."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half RoPE. q [T, Hq, D], k [T, Hkv, D]; cos_sin [P, D] fp32 = cat(cos, sin) of D/2 freqs."""
        cos, sin = cos_sin[positions].chunk(2, dim=-1)
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class FlashInferOps(TorchOps):
    """Fused CUDA kernels from flashinfer. `add_rms_norm` and `rotary` work in place."""

    name = "flashinfer"

    def __init__(self) -> None:
        import flashinfer

        self._fi = flashinfer

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        return self._fi.norm.rmsnorm(x.reshape(-1, shape[-1]), weight, eps).view(shape)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        self._fi.norm.fused_add_rmsnorm(x, residual, weight, eps)
        return x, residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._fi.activation.silu_and_mul(x)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self._fi.rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, q.shape[-1], cos_sin, is_neox=True)
        return q, k

    def first_uses(self, arch: ModelArch, dtype: torch.dtype, device: torch.device) -> list[Callable[[], object]]:
        """One call of each kernel module on two tokens of `arch`'s shapes (`actors.runner.jit_warmup`): RMSNorm
        (one module with and without the residual add), SiLU-and-mul, RoPE."""
        def ones(*shape: int) -> torch.Tensor:
            return torch.ones(*shape, dtype=dtype, device=device)

        h, d = arch.hidden_size, arch.head_dim
        positions = torch.arange(2, device=device)
        cos_sin = torch.ones(2, d, dtype=torch.float32, device=device)
        return [
            lambda: self.add_rms_norm(ones(2, h), ones(2, h), ones(h), 1e-6),
            lambda: self.silu_and_mul(ones(2, 2 * arch.intermediate_size)),
            lambda: self.rotary(positions, ones(2, arch.num_heads, d), ones(2, arch.num_kv_heads, d), cos_sin),
        ]


def make_ops(name: str) -> TorchOps:
    """`torch` (reference) or `flashinfer` (fused CUDA kernels)."""
    return FlashInferOps() if name == "flashinfer" else TorchOps()
