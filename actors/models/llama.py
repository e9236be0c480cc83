"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over packed token batches.

The model sees a flat batch of tokens (`[T]` ids and positions) and calls
`attn(q, k, v, layer_id)` for attention; it knows nothing of pages, sequences or
batching. Q/K/V and gate/up projections are fused into single matmuls; the loader
(`load_weights`) fuses Hugging Face's separate tensors on the way in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from actors.config import ConfigError, ModelArch
from actors.models.ops import TorchOps


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: TorchOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); may reuse x and residual's storage."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies [D/2], with Llama 3 or linear scaling applied if configured."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = arch.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


class Rotary(nn.Module):
    """RoPE over all positions: `cos_sin` [P, D] fp32 holds cat(cos, sin) of the D/2 frequencies."""

    def __init__(self, arch: ModelArch, max_positions: int, ops: TorchOps) -> None:
        super().__init__()
        self.arch = arch
        self.max_positions = max_positions
        self.ops = ops
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def build(self, device: torch.device) -> None:
        inv_freq = rope_inv_freq(self.arch).to(device)
        freqs = torch.arange(self.max_positions, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rotary(positions, q, k, self.cos_sin)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer_id: int, rotary: Rotary) -> None:
        super().__init__()
        self.arch = arch
        self.layer_id = layer_id
        self.rotary = rotary
        self.qkv_proj = nn.Linear(arch.hidden_size, arch.q_size + 2 * arch.kv_size, bias=arch.attention_bias)
        self.o_proj = nn.Linear(arch.q_size, arch.hidden_size, bias=False)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, rotary.ops)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, rotary.ops)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        a = self.arch
        q, k, v = self.qkv_proj(x).split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q = q.view(-1, a.num_heads, a.head_dim)
        k = k.view(-1, a.num_kv_heads, a.head_dim)
        v = v.view(-1, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = attn(q, k, v, self.layer_id)
        return self.o_proj(o.reshape(-1, a.q_size))


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, ops: TorchOps) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_id: int, rotary: Rotary) -> None:
        super().__init__()
        ops = rotary.ops
        self.self_attn = Attention(arch, layer_id, rotary)
        self.mlp = MLP(arch, ops)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ops)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, attn: AttentionFn
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block with the residual carried separately: returns (mlp output, residual)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add(x, residual)
        h = self.self_attn(positions, h, attn)
        h, residual = self.post_attention_layernorm.add(h, residual)
        return self.mlp(h), residual


class Backbone(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int, ops: TorchOps) -> None:
        super().__init__()
        self.rotary = Rotary(arch, max_positions, ops)
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, self.rotary) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ops)


class CausalLM(nn.Module):
    """Module names follow Hugging Face's, so checkpoints load by name (plus fusing)."""

    def __init__(self, arch: ModelArch, max_positions: int, ops: TorchOps | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.model = Backbone(arch, max_positions, ops or TorchOps())
        if not arch.tie_word_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, H]."""
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(positions, x, residual, attn)
        return self.model.norm.add(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] in the weights' dtype (the sampler widens them where it computes)."""
        weight = self.model.embed_tokens.weight if self.arch.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, weight)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up on the way."""
        a = self.arch
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0, a.q_size),
            "k_proj": ("qkv_proj", a.q_size, a.kv_size),
            "v_proj": ("qkv_proj", a.q_size + a.kv_size, a.kv_size),
            "gate_proj": ("gate_up_proj", 0, a.intermediate_size),
            "up_proj": ("gate_up_proj", a.intermediate_size, a.intermediate_size),
        }
        seen: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and a.tie_word_embeddings):
                continue
            target, rows = name, None
            for part, (fused_name, offset, size) in fused.items():
                if f".{part}." in name:
                    target, rows = name.replace(part, fused_name), (offset, size)
                    break
            param = params.get(target)
            if param is None:
                raise ConfigError(f"checkpoint tensor {name!r} has no place in {a.architecture}")
            dst = param if rows is None else param.narrow(0, rows[0], rows[1])
            if dst.shape != tensor.shape:
                raise ConfigError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            seen.add(target if rows is None else f"{target}[{rows[0]}]")
        expected = {n for n in params if not any(f in n for f in ("qkv_proj", "gate_up_proj"))}
        missing = expected - seen
        if missing:
            raise ConfigError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
