"""Random-weight Hugging Face checkpoints in real architectures (no model hub here).

`make_model(preset, out_dir, seed)` writes config.json, safetensors shards (with an
index when sharded), a byte-level BPE tokenizer built with `tokenizers`, and a chat
template: a directory that both `transformers` and our loader read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from actors.config import ConfigError

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# head_dim 128 like the real models, so the GPU tests exercise the same flashinfer kernels
_TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=128, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-6)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        _TINY, architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=256),
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
    ),
    "tiny-qwen2": dict(
        _TINY, architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu",
    ),
    "tiny-qwen3": dict(
        _TINY, architectures=["Qwen3ForCausalLM"], model_type="qwen3", rope_theta=1000000.0,
        tie_word_embeddings=False, attention_bias=False, use_sliding_window=False, hidden_act="silu",
    ),
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
    ),
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, use_sliding_window=False, hidden_act="silu",
    ),
}


def hf_config(preset: str, dtype: str = "auto") -> dict[str, Any]:
    """The preset's config.json content, with token ids of our byte-level tokenizer."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    if dtype == "auto":
        dtype = "float32" if preset.startswith("tiny") else "bfloat16"
    cfg.update(
        bos_token_id=256,
        eos_token_id=[257, 259],
        torch_dtype=dtype,
        initializer_range=0.02,
        use_cache=True,
    )
    return cfg


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """Byte-level BPE with no merges: 256 byte tokens, specials, reserved fillers up to the vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    for i in range(256 + len(SPECIAL_TOKENS), vocab_size):
        vocab[f"<|reserved_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[3], pad_token=SPECIAL_TOKENS[1]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def hf_weight_shapes(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Hugging Face checkpoint of this config."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    bias = cfg["model_type"] == "qwen2"
    yield "model.embed_tokens.weight", (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        for name, rows in (("q", heads * d), ("k", kv * d), ("v", kv * d)):
            yield p + f"self_attn.{name}_proj.weight", (rows, h)
            if bias:
                yield p + f"self_attn.{name}_proj.bias", (rows,)
        if cfg["model_type"] == "qwen3":
            yield p + "self_attn.q_norm.weight", (d,)
            yield p + "self_attn.k_norm.weight", (d,)
        yield p + "self_attn.o_proj.weight", (h, heads * d)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (v, h)


def random_weights(cfg: dict[str, Any], seed: int, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random tensors: norms near 1, matrices N(0, 0.02), biases N(0, 0.02)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, cfg["torch_dtype"])
    for name, shape in hf_weight_shapes(cfg):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
        else:
            t = 0.02 * torch.randn(shape, generator=gen, device=device)
        yield name, t.to(dtype)


def make_model(preset: str, out_dir: str | Path, seed: int = 0, device: str = "cpu",
               dtype: str = "auto", shard_bytes: int = 4 << 30, weights: bool = True) -> Path:
    """Write a random-weight checkpoint of `preset` into `out_dir` and return its path.

    With `weights=False` only config and tokenizer are written (engines then run with
    `load_format="dummy"`, as speed benchmarks do).
    """
    cfg = hf_config(preset, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2) + "\n"
    )
    write_tokenizer(out, cfg["vocab_size"])
    if not weights:
        return out
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in random_weights(cfg, seed, device):
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
