"""config.json fields that change a model's math are either computed as transformers computes them, refused with a
ConfigError naming them, or (sliding windows) make the engine cap its context where full attention is the same.

Each logits test writes a tiny random checkpoint with transformers itself (its config class reads our raw
config.json, as it would a real checkpoint's), loads it with transformers and with our loader, and compares the
logits of one prompt: our model runs with plain causal attention, so only the model's own math is compared.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from actors.config import ConfigError, EngineConfig, ModelArch, SchedulerConfig
from actors.models.loader import build_model

pytestmark = pytest.mark.timeout(300)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6, torch_dtype="float32")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3"}
PROMPT_LEN = 40


def config(arch: str, **fields: Any) -> dict[str, Any]:
    """A tiny config.json of `arch`; a field set to `...` is left out."""
    cfg: dict[str, Any] = dict(TINY, architectures=[arch], model_type=MODEL_TYPES[arch])
    if arch == "MistralForCausalLM":
        cfg["sliding_window"] = None
    cfg.update(fields)
    return {k: v for k, v in cfg.items() if v is not ...}


def write_checkpoint(path: Path, cfg: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32,
                     edit: Any = None) -> Path:
    """config.json as given, and random weights of the model transformers builds from it (every tensor, biases
    included, drawn so that none is zero). `edit(state_dict)` may change the tensors before they are saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # tied: saved once, as embed_tokens
        noise = torch.randn(p.shape, generator=gen)
        sd[name] = (1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise).to(dtype).contiguous()
    if edit is not None:
        edit(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def prompt(n: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(ids[None]).logits[0].float()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
    """One sequence, full causal attention: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    return o.transpose(0, 1)


def our_logits(path: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    arch = ModelArch.from_dir(path)
    model = build_model(arch, dtype, torch.device("cpu"), len(ids), model_dir=path)
    with torch.inference_mode():
        hidden = model(ids, torch.arange(len(ids)), causal_attention)
        return model.compute_logits(hidden).float()


def assert_same_logits(path: Path, ids: torch.Tensor | None = None, atol: float = 1e-4) -> None:
    ids = prompt() if ids is None else ids
    want, got = hf_logits(path, ids), our_logits(path, ids)
    assert (got - want).abs().max().item() < atol, f"max |logit difference| {(got - want).abs().max().item():.3g}"


# -- fields computed as transformers computes them ----------------------------------------------------------------


@pytest.mark.parametrize("arch, fields", [
    ("LlamaForCausalLM", dict(attention_bias=True)),  # q, k, v *and* o_proj carry a bias
    ("LlamaForCausalLM", dict(mlp_bias=True)),  # gate, up and down carry a bias
    ("Qwen3ForCausalLM", dict(attention_bias=True, head_dim=32)),  # q, k, v and o_proj carry a bias
    ("MistralForCausalLM", dict(attention_bias=True, mlp_bias=True)),  # MistralForCausalLM ignores both
], ids=["llama-attention_bias", "llama-mlp_bias", "qwen3-attention_bias", "mistral-ignores-biases"])
def test_bias_fields_match_transformers(tmp_path: Path, arch: str, fields: dict[str, Any]) -> None:
    assert_same_logits(write_checkpoint(tmp_path, config(arch, **fields)))


def test_mistral_attention_bias_leaves_no_uninitialized_bias() -> None:
    """MistralForCausalLM builds q/k/v without a bias whatever attention_bias says; we built one, which the loader
    then left as uninitialized memory (a checkpoint of this model has no bias to fill it)."""
    arch = ModelArch.from_hf_config(config("MistralForCausalLM", attention_bias=True))
    assert not arch.attention_bias and not arch.o_proj_bias and not arch.mlp_bias


@pytest.mark.parametrize("arch, fields", [
    ("LlamaForCausalLM", dict(rope_theta=10000.0, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                    original_max_position_embeddings=64))),
    ("Qwen2ForCausalLM", dict(rope_theta=1e6, rope_scaling=dict(type="yarn", factor=4.0,
                                                                original_max_position_embeddings=32))),
    ("Qwen3ForCausalLM", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=2.0, beta_fast=16,
                                                   beta_slow=2, attention_factor=0.9))),
    ("LlamaForCausalLM", dict(rope_scaling=dict(type="dynamic", factor=2.0))),
    ("LlamaForCausalLM", dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0,
                                                                     low_freq_factor=1.0, high_freq_factor=4.0))),
    # transformers takes the theta inside rope_parameters over the top-level one, and applies its scaling
    ("LlamaForCausalLM", dict(rope_theta=10000.0, rope_parameters=dict(rope_type="linear", factor=4.0,
                                                                       rope_theta=500000.0))),
], ids=["llama-yarn", "qwen2-yarn-legacy-type", "qwen3-yarn-rope_parameters", "llama-dynamic",
        "llama3-default-original-len", "theta-and-rope_parameters"])
def test_rope_fields_match_transformers(tmp_path: Path, arch: str, fields: dict[str, Any]) -> None:
    assert_same_logits(write_checkpoint(tmp_path, config(arch, **fields)))


def test_tied_embeddings_with_a_different_lm_head_in_the_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                    ) -> None:
    """tie_word_embeddings is set, yet the checkpoint has its own lm_head.weight: transformers does not tie them
    and computes the logits with lm_head.weight; so do we (we used embed_tokens.weight)."""
    def add_head(sd: dict[str, torch.Tensor]) -> None:
        sd["lm_head.weight"] = 0.05 * torch.randn(sd["model.embed_tokens.weight"].shape,
                                                  generator=torch.Generator().manual_seed(9))

    path = write_checkpoint(tmp_path, config("Qwen2ForCausalLM", tie_word_embeddings=True), edit=add_head)
    with caplog.at_level(logging.WARNING):
        assert_same_logits(path)
    assert "lm_head.weight differs from embed_tokens.weight" in caplog.text


def test_tied_embeddings_with_an_equal_lm_head_stay_tied(tmp_path: Path) -> None:
    def copy_head(sd: dict[str, torch.Tensor]) -> None:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()

    path = write_checkpoint(tmp_path, config("LlamaForCausalLM", tie_word_embeddings=True), edit=copy_head)
    model = build_model(ModelArch.from_dir(path), torch.float32, torch.device("cpu"), 16, model_dir=path)
    assert "lm_head" not in model._modules
    assert_same_logits(path)


@pytest.mark.parametrize("arch, fields", [
    ("MistralForCausalLM", dict(num_attention_heads=16, num_key_value_heads=..., head_dim=8)),  # transformers: 8
    ("Qwen3ForCausalLM", dict(head_dim=...)),  # transformers: 128, not hidden_size // heads
], ids=["mistral-kv-heads", "qwen3-head_dim"])
def test_missing_fields_take_transformers_defaults(tmp_path: Path, arch: str, fields: dict[str, Any]) -> None:
    """A field left out of config.json means transformers' default for that architecture; the weights' shapes
    follow it (before: our loader refused them as the wrong shape)."""
    assert_same_logits(write_checkpoint(tmp_path, config(arch, **fields)))


def test_missing_field_defaults_per_architecture() -> None:
    def arch(name: str, **fields: Any) -> ModelArch:
        return ModelArch.from_hf_config(config(name, **fields))

    llama = arch("LlamaForCausalLM", num_key_value_heads=..., head_dim=..., max_position_embeddings=...)
    assert (llama.num_kv_heads, llama.head_dim, llama.max_position_embeddings) == (4, 16, 2048)
    assert arch("MistralForCausalLM", num_attention_heads=16, num_key_value_heads=...).num_kv_heads == 8
    assert arch("MistralForCausalLM", max_position_embeddings=...).max_position_embeddings == 131072
    assert arch("Qwen2ForCausalLM", max_position_embeddings=...).max_position_embeddings == 32768
    assert arch("Qwen3ForCausalLM", head_dim=...).head_dim == 128
    assert arch("Qwen2ForCausalLM", rms_norm_eps=...).rms_norm_eps == 1e-6


def test_bf16_checkpoint_loaded_in_fp32_matches_transformers(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, config("LlamaForCausalLM", torch_dtype="bfloat16"), dtype=torch.bfloat16)
    assert ModelArch.from_dir(path).checkpoint_dtype == "bfloat16"
    assert_same_logits(path)


def test_partial_rotary_factor_with_default_rope_is_ignored_as_transformers_does(tmp_path: Path) -> None:
    assert_same_logits(write_checkpoint(tmp_path, config("LlamaForCausalLM", partial_rotary_factor=0.5)))


# -- fields refused --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, words", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act 'gelu_pytorch_tanh'"),
    (dict(quantization_config=dict(quant_method="awq", bits=4)), "quantization_config (quant_method 'awq')"),
    (dict(quantization_config=dict(quant_method="fp8")), "quantization_config"),
    (dict(rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)),
     "rope_scaling type 'longrope'"),
    (dict(partial_rotary_factor=0.5, rope_scaling=dict(rope_type="linear", factor=2.0)), "partial_rotary_factor"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), "lacks low_freq_factor, high_freq_factor"),
], ids=["gelu", "gelu-tanh", "awq", "fp8", "longrope", "partial-rotary-scaled", "llama3-incomplete"])
def test_fields_the_engine_cannot_compute_are_refused(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        ModelArch.from_hf_config(config("LlamaForCausalLM", **fields))


def test_quantized_checkpoint_is_refused_by_from_dir(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config("Qwen2ForCausalLM", quantization_config=dict(
        quant_method="gptq", bits=4))))
    with pytest.raises(ConfigError, match=r"quantization_config \(quant_method 'gptq'\)"):
        ModelArch.from_dir(path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_tensors_are_refused_by_the_loader(tmp_path: Path, dtype: torch.dtype) -> None:
    def quantize(sd: dict[str, torch.Tensor]) -> None:
        sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"].to(dtype)

    path = write_checkpoint(tmp_path, config("LlamaForCausalLM"), edit=quantize)
    with pytest.raises(ConfigError, match=r"'model.layers.0.mlp.down_proj.weight' is torch\.(int8|float8)"):
        our_logits(path, prompt(4))


@pytest.mark.parametrize("missing", ["model.layers.0.self_attn.k_proj.bias", "model.layers.1.mlp.up_proj.weight"])
def test_a_missing_part_of_a_fused_tensor_is_refused(tmp_path: Path, missing: str) -> None:
    """q/k/v and gate/up are fused on load: a checkpoint lacking one part left that slice uninitialized."""
    path = write_checkpoint(tmp_path, config("Qwen2ForCausalLM"), edit=lambda sd: sd.pop(missing))
    with pytest.raises(ConfigError, match="checkpoint lacks 1 tensors"):
        our_logits(path, prompt(4))


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown architecture 'GPT2LMHeadModel'"):
        ModelArch.from_hf_config(dict(config("LlamaForCausalLM"), architectures=["GPT2LMHeadModel"]))


# -- sliding windows: the context is capped at the window --------------------------------------------------------------


@pytest.mark.parametrize("arch, fields, window", [
    ("MistralForCausalLM", dict(sliding_window=4096), 4096),  # Mistral 7B v0.1
    ("MistralForCausalLM", dict(sliding_window=...), 4096),  # absent: transformers' default
    ("MistralForCausalLM", dict(sliding_window=None), None),  # v0.2 on
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=32, max_window_layers=1), 32),
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=32, max_window_layers=2), None),  # no layer
    ("Qwen2ForCausalLM", dict(use_sliding_window=False, sliding_window=32, max_window_layers=0), None),
    ("Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=32, max_window_layers=...), None),  # 28 > 2
    ("Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=32, max_window_layers=5,
                              layer_types=["sliding_attention", "full_attention"]), 32),  # layer_types decide
    ("LlamaForCausalLM", dict(sliding_window=32, use_sliding_window=True), None),  # LlamaModel has none
], ids=["mistral-v0.1", "mistral-absent", "mistral-null", "qwen2-on", "qwen2-past-layers", "qwen2-off",
        "qwen3-default-max_window_layers", "qwen3-layer_types", "llama-ignores"])
def test_sliding_window_read_as_transformers_does(arch: str, fields: dict[str, Any], window: int | None) -> None:
    assert ModelArch.from_hf_config(config(arch, max_position_embeddings=32768, **fields)).sliding_window == window


def test_sliding_layers_without_a_window_are_refused() -> None:
    cfg = config("Qwen2ForCausalLM", use_sliding_window=False, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ConfigError, match="layer_types names sliding_attention"):
        ModelArch.from_hf_config(cfg)


@pytest.mark.parametrize("arch, fields", [
    ("MistralForCausalLM", dict(sliding_window=24)),
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=24, max_window_layers=1)),
], ids=["mistral", "qwen2"])
def test_sliding_window_caps_max_model_len(tmp_path: Path, caplog: pytest.LogCaptureFixture, arch: str,
                                          fields: dict[str, Any]) -> None:
    """Full attention equals the window's for up to `sliding_window` tokens, and differs past it: the engine's
    context stops at the window (with a warning); a user's longer max_model_len is refused."""
    path = write_checkpoint(tmp_path / "m", config(arch, **fields))
    a = ModelArch.from_dir(path)
    with caplog.at_level(logging.WARNING):
        assert EngineConfig(model=str(path)).max_model_len(a) == 24
    assert "sliding_window=24" in caplog.text and "capped" in caplog.text
    assert EngineConfig(model=str(path), scheduler=SchedulerConfig(max_model_len=16)).max_model_len(a) == 16
    with pytest.raises(ConfigError, match="exceeds the model's sliding_window 24"):
        EngineConfig(model=str(path), scheduler=SchedulerConfig(max_model_len=25)).max_model_len(a)
    ids = prompt(PROMPT_LEN)
    want, got = hf_logits(path, ids), our_logits(path, ids)
    diff = (got - want).abs().amax(dim=-1)
    assert diff[:24].max().item() < 1e-4  # within the window: the same
    assert diff[24:].min().item() > 1e-3  # past it transformers attends to the window only


def test_engine_serves_the_implemented_fields_as_transformers_generates(tmp_path: Path) -> None:
    """Through the whole engine (paged KV cache, chunked prefill, the sampler): a Llama checkpoint with q/k/v/o and
    MLP biases, YaRN, and tied embeddings beside a different lm_head.weight generates transformers' greedy tokens."""
    from transformers import AutoModelForCausalLM

    from actors.engine.frontend import LLM
    from actors.models.make_model import write_tokenizer
    from actors.request import SamplingParams

    def add_head(sd: dict[str, torch.Tensor]) -> None:
        sd["lm_head.weight"] = 0.05 * torch.randn(sd["model.embed_tokens.weight"].shape,
                                                  generator=torch.Generator().manual_seed(9))

    cfg = config("LlamaForCausalLM", vocab_size=512, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                 rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64))
    path = write_checkpoint(tmp_path, cfg, edit=add_head)
    write_tokenizer(path, cfg["vocab_size"])
    prompts = [prompt(n, seed=n).tolist() for n in (5, 37, 90)]
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    want = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                              eos_token_id=None, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    llm = LLM(path, scheduler=SchedulerConfig(max_prefill_tokens=32))
    try:
        got = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    finally:
        llm.shutdown()
    assert [o.token_ids for o in got] == want


def test_no_cap_without_a_sliding_window(tmp_path: Path) -> None:
    a = ModelArch.from_hf_config(config("MistralForCausalLM", sliding_window=None))
    assert EngineConfig(model=str(tmp_path)).max_model_len(a) == TINY["max_position_embeddings"]


def test_after_layer_is_called_once_each_decoder_layer_is_queued_and_changes_nothing() -> None:
    """`CausalLM.forward`'s `after_layer` (the prefill's launch window waits there) comes after each layer's work,
    once per layer, and the hidden states are those of a pass without it."""
    from actors.models.llama import CausalLM

    arch = ModelArch.from_hf_config(config("LlamaForCausalLM"))
    torch.manual_seed(0)
    model = CausalLM(arch, 64).eval()
    model.model.rotary.build(torch.device("cpu"))
    attended: list[int] = []

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        attended.append(layer_id)
        return q

    ids, positions = torch.tensor([5, 7, 9]), torch.arange(3)
    plain = model(ids, positions, attn)
    attended.clear()
    seen: list[list[int]] = []
    held = model(ids, positions, attn, after_layer=lambda: seen.append(list(attended)))
    assert seen == [list(range(i + 1)) for i in range(arch.num_layers)]
    assert torch.equal(held, plain)
