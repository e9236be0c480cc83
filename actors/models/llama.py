"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over packed token batches.

The model sees a flat batch of tokens (`[T]` ids and positions) and calls
`attn(q, k, v, layer_id)` for attention; it knows nothing of pages, sequences or
batching. Q/K/V and gate/up projections are fused into single matmuls; the loader
(`load_weights`) fuses Hugging Face's separate tensors on the way in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from actors.config import ConfigError, ModelArch
from actors.models.ops import TorchOps

log = logging.getLogger(__name__)


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


def rope_parameters(arch: ModelArch, max_positions: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [D/2], the factor on cos and sin) of the configured RoPE, as transformers' rope init
    functions compute them (`arch.rope_scaling` is normalized by ModelArch: it names its `rope_type`)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = arch.rope_scaling
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "dynamic":
        # transformers recomputes the frequencies only once a sequence grows past max_position_embeddings; below
        # it, dynamic NTK is the plain RoPE
        if max_positions is not None and max_positions > arch.max_position_embeddings:
            raise ConfigError(f"rope_scaling type 'dynamic' beyond max_position_embeddings "
                              f"({arch.max_position_embeddings}) is not supported")
        return inv_freq, 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(arch, scaling)
    raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, dynamic, llama3, yarn)")


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies [D/2], with the configured scaling applied."""
    return rope_parameters(arch)[0]


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(arch: ModelArch, s: dict) -> tuple[torch.Tensor, float]:
    """YaRN (static, as in transformers' `_compute_yarn_parameters`): frequencies blended between interpolated and
    extrapolated over a ramp of dimensions, and cos/sin scaled by the attention factor."""
    base, dim = arch.rope_theta, arch.head_dim
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or arch.max_position_embeddings / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rotary(nn.Module):
    """RoPE over all positions: `cos_sin` [P, D] fp32 holds cat(cos, sin) of the D/2 frequencies."""

    def __init__(self, arch: ModelArch, max_positions: int, ops: TorchOps) -> None:
        super().__init__()
        self.arch = arch
        self.max_positions = max_positions
        self.ops = ops
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def build(self, device: torch.device) -> None:
        inv_freq, scale = rope_parameters(self.arch, self.max_positions)
        inv_freq = inv_freq.to(device)
        freqs = torch.arange(self.max_positions, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        if scale != 1.0:
            self.cos_sin = self.cos_sin * scale

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rotary(positions, q, k, self.cos_sin)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer_id: int, rotary: Rotary) -> None:
        super().__init__()
        self.arch = arch
        self.layer_id = layer_id
        self.rotary = rotary
        self.qkv_proj = nn.Linear(arch.hidden_size, arch.q_size + 2 * arch.kv_size, bias=arch.attention_bias)
        self.o_proj = nn.Linear(arch.q_size, arch.hidden_size, bias=arch.o_proj_bias)
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
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=arch.mlp_bias)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias)
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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn,
                after_layer: Callable[[], None] | None = None) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, H]. `after_layer` is called once each decoder layer's
        work is queued."""
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(positions, x, residual, attn)
            if after_layer is not None:
                after_layer()
        return self.model.norm.add(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] in the weights' dtype (the sampler widens them where it computes)."""
        head = self._modules.get("lm_head")
        return F.linear(hidden, self.model.embed_tokens.weight if head is None else head.weight)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up on the way. Every parameter, each part of a
        fused one included, must come from the checkpoint. With tied embeddings, a checkpoint's own lm_head.weight
        that differs from embed_tokens.weight is used for the logits, as transformers does."""
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
        tied_head = None
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if not tensor.is_floating_point() or tensor.element_size() < 2:
                raise ConfigError(f"checkpoint tensor {name!r} is {tensor.dtype}: quantized weights are not supported")
            if name == "lm_head.weight" and a.tie_word_embeddings:
                tied_head = tensor
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
        expected = set()
        for n in params:
            parts = [f"{n}[{offset}]" for fused_name, offset, _ in fused.values() if f".{fused_name}." in n]
            expected.update(parts or [n])
        missing = expected - seen
        if missing:
            raise ConfigError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        embed = self.model.embed_tokens.weight
        if tied_head is not None:
            if tied_head.shape != embed.shape:
                raise ConfigError(f"checkpoint tensor 'lm_head.weight' has shape {tuple(tied_head.shape)}, "
                                  f"expected {tuple(embed.shape)}")
            head = tied_head.to(device=embed.device, dtype=embed.dtype)
            if not torch.equal(head, embed):
                log.warning("tie_word_embeddings is set but the checkpoint's lm_head.weight differs from "
                            "embed_tokens.weight: using lm_head.weight for the logits, as transformers does")
                self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False, device=embed.device,
                                         dtype=embed.dtype).requires_grad_(False)
                self.lm_head.weight.copy_(head)
