"""Engine configuration: frozen dataclasses, validated on construction.

`ModelArch` is read from a Hugging Face `config.json`; everything else is chosen by
the user (CLI flags, the Ray actor's options, or code).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
EngineMode = Literal["unified", "semi-pd", "disagg"]
ENGINE_MODES: tuple[str, ...] = ("unified", "semi-pd", "disagg")
ATTENTION_BACKENDS: tuple[str, ...] = ("torch", "flashinfer")
DECODE_ATTENTION: tuple[str, ...] = ("fa2", "fa3", "cuda-cores")  # flashinfer's decode kernels
PREFILL_ORDERS: tuple[str, ...] = ("fcfs", "edf")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ConfigError(ValueError):
    """A configuration or checkpoint problem the user must fix (CLI exit code 2)."""


# transformers' defaults for config.json fields a checkpoint may leave out (its *Config classes), where they differ
# by architecture: a missing field means what it means to transformers
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(num_key_value_heads=None, head_dim=None, max_position_embeddings=2048),
    "MistralForCausalLM": dict(num_key_value_heads=8, head_dim=None, max_position_embeddings=4096 * 32,
                               sliding_window=4096),
    "Qwen2ForCausalLM": dict(num_key_value_heads=32, head_dim=None, max_position_embeddings=32768,
                             sliding_window=4096, max_window_layers=28),
    "Qwen3ForCausalLM": dict(num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                             sliding_window=4096, max_window_layers=28),
}
ACTIVATIONS = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ("factor",)}


@dataclass(frozen=True)
class ModelArch:
    """The shape of a decoder-only transformer, as its checkpoint describes it."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2; Llama and Qwen3 with `attention_bias`)
    qk_norm: bool  # RMSNorm on q and k per head (Qwen3)
    rope_scaling: dict[str, Any] | None = None  # normalized: has `rope_type` (not "default"), as transformers reads it
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    checkpoint_dtype: str = "float32"
    o_proj_bias: bool = False  # o_proj carries a bias (Llama and Qwen3 with `attention_bias`)
    mlp_bias: bool = False  # gate/up/down projections carry a bias (Llama's `mlp_bias`)
    # the attention window of the sliding-window layers (Mistral's `sliding_window`; Qwen2/3's with
    # `use_sliding_window`), None when every layer attends to the whole context. The model computes full attention,
    # which equals the window's for contexts of up to `sliding_window` tokens: EngineConfig caps max_model_len there.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.architecture!r}; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArch:
        """Read config.json as transformers' modeling code for the architecture does. A field that changes the math
        in a way this engine does not compute (another activation, a quantized checkpoint, a RoPE type it lacks)
        raises ConfigError naming it, rather than serving the checkpoint wrong."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ConfigError("config.json has no 'architectures' entry")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"unknown architecture {arch!r}; supported: " + ", ".join(SUPPORTED_ARCHITECTURES))
        defaults = _ARCH_DEFAULTS[arch]

        def get(key: str, default: Any = None) -> Any:
            return cfg[key] if key in cfg else defaults.get(key, default)

        for key in ("quantization_config", "compression_config"):
            if cfg.get(key):
                method = cfg[key].get("quant_method", "?") if isinstance(cfg[key], dict) else "?"
                raise ConfigError(f"config.json has a {key} (quant_method {method!r}): quantized checkpoints are "
                                  "not supported; use an unquantized (fp32/fp16/bf16) checkpoint")
        act = cfg.get("hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {act!r} is not supported (only silu): {arch}'s MLP would compute "
                              "another function")
        heads = cfg["num_attention_heads"]
        head_dim = get("head_dim") or cfg["hidden_size"] // heads
        max_pos = get("max_position_embeddings")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_theta, rope_scaling = _rope(cfg, max_pos)
        bias = bool(cfg.get("attention_bias", False))
        qkv_bias, o_bias, mlp_bias = {  # as each architecture's modeling code builds its Linear layers
            "LlamaForCausalLM": (bias, bias, bool(cfg.get("mlp_bias", False))),
            "MistralForCausalLM": (False, False, False),
            "Qwen2ForCausalLM": (True, False, False),
            "Qwen3ForCausalLM": (bias, bias, False),
        }[arch]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps") or 1e-6,
            rope_theta=rope_theta,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            rope_scaling=rope_scaling,
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            checkpoint_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=_sliding_window(arch, cfg, get),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelArch:
        """The checkpoint's config.json; generation_config.json's EOS ids join config.json's, as vLLM stops on
        both (Llama 3.x and Qwen2.5 instruct models name more there)."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{model_dir}: no config.json (expected a Hugging Face checkpoint directory)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        try:
            arch = cls.from_hf_config(cfg)
        except KeyError as e:
            raise ConfigError(f"{path}: missing field {e.args[0]!r}") from e
        eos = _token_ids(generation_config(model_dir).get("eos_token_id"))
        return replace(arch, eos_token_ids=tuple(dict.fromkeys(arch.eos_token_ids + eos)))

    def with_eos_token_id(self, token_id: int | None) -> ModelArch:
        """This arch with `token_id` (the tokenizer's EOS, vLLM's primary one) among its EOS ids; unchanged for
        None or an id outside the vocabulary."""
        if token_id is None or not 0 <= token_id < self.vocab_size or token_id in self.eos_token_ids:
            return self
        return replace(self, eos_token_ids=(*self.eos_token_ids, token_id))


def _rope(cfg: dict[str, Any], max_pos: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, the RoPE scaling dict or None), read as transformers' RotaryEmbeddingConfigMixin does: the legacy
    `rope_scaling` takes precedence over `rope_parameters`; `rope_theta` inside that dict over the top-level field;
    llama3/yarn take `original_max_position_embeddings` from the top level, else the dict, else
    max_position_embeddings."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_scaling/rope_parameters must be a JSON object, got {rope!r}")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported")
    rope = dict(rope)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    theta = rope.get("rope_theta")
    if theta is None:
        theta = cfg.get("rope_theta")
    theta = float(theta if theta is not None else 10000.0)
    if kind not in ROPE_TYPES:
        raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return theta, None  # transformers' default RoPE reads nothing else (partial_rotary_factor neither)
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if factor is not None and factor != 1:
        raise ConfigError(f"partial_rotary_factor {factor} with rope_scaling type {kind!r} is not supported "
                          "(transformers cannot run it for these architectures either)")
    missing = [k for k in _ROPE_REQUIRED[kind] if k not in rope]
    if missing:
        raise ConfigError(f"rope_scaling type {kind!r} lacks {', '.join(missing)}")
    if kind in ("llama3", "yarn"):
        if cfg.get("original_max_position_embeddings") is not None:
            rope["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", max_pos)
    rope["rope_type"] = kind
    rope.pop("type", None)
    return theta, rope


def _sliding_window(arch: str, cfg: dict[str, Any], get: Any) -> int | None:
    """The window of the model's sliding-window layers, None when it has none, as transformers decides: Mistral
    slides every layer by `sliding_window` (4096 when the field is absent, none when it is null); Qwen2/3 only with
    `use_sliding_window`, in the layers `layer_types` names (by default those from `max_window_layers` on)."""
    if arch == "LlamaForCausalLM":
        return None  # LlamaModel has no sliding window: it ignores these fields
    window = get("sliding_window")
    if arch == "MistralForCausalLM":
        return int(window) if window else None
    if not cfg.get("use_sliding_window", False):
        window = None
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        first = get("max_window_layers")
        layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                       for i in range(cfg["num_hidden_layers"])]
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ConfigError(f"layer_types {sorted(unknown)} are not supported")
    if "sliding_attention" not in layer_types:
        return None
    if not window:
        raise ConfigError("layer_types names sliding_attention layers but use_sliding_window/sliding_window set no "
                          "window")
    return int(window)


GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_config(model_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json ({} when there is none or it is not a JSON object)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def generation_defaults(model_dir: str | Path) -> dict[str, float | int]:
    """The sampling parameters the checkpoint recommends (generation_config.json's temperature, top_p, top_k,
    min_p, repetition_penalty, and max_new_tokens as `max_tokens`): what a request that sets none of them gets,
    as with vLLM's default `--generation-config auto`."""
    cfg = generation_config(model_dir)
    out = {k: cfg[k] for k in GENERATION_DEFAULT_FIELDS if isinstance(cfg.get(k), (int, float))
           and not isinstance(cfg.get(k), bool)}
    cap = cfg.get("max_new_tokens")
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
        out["max_tokens"] = cap
    return out


def _token_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    return tuple(v for v in value if isinstance(v, int)) if isinstance(value, list) else ()


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool: `num_pages` pages of `page_size` tokens for all layers.

    When `num_pages` is None the engine sizes the pool from `memory_fraction` of the
    free device memory after the weights are loaded (on CPU: `cpu_kv_bytes`).
    """

    page_size: int = 16
    num_pages: int | None = None
    memory_fraction: float = 0.85
    cpu_kv_bytes: int = 256 << 20
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ConfigError(f"num_pages must be at least 2, got {self.num_pages}")
        if not 0.0 < self.memory_fraction <= 0.98:
            raise ConfigError(f"memory_fraction must be in (0, 0.98], got {self.memory_fraction}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits of the prefill and decode schedulers.

    `max_prefill_tokens` is the token budget of one prefill iteration (the chunk size
    of chunked prefill); `max_decode_seqs` bounds the decode batch. `decode_reserve_pages`: the KV pages prefill
    admission leaves free for decode growth (a new request's first page must leave that many free); the engine
    refuses to start when its pool has no more pages than that (`check_decode_reserve`).
    """

    max_prefill_tokens: int = 4096
    max_decode_seqs: int = 256
    max_model_len: int | None = None
    decode_reserve_pages: int = 0

    def __post_init__(self) -> None:
        if self.max_prefill_tokens < 1:
            raise ConfigError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.max_decode_seqs < 1:
            raise ConfigError(f"max_decode_seqs must be >= 1, got {self.max_decode_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.decode_reserve_pages < 0:
            raise ConfigError(f"decode_reserve_pages must be >= 0, got {self.decode_reserve_pages}")


def check_decode_reserve(decode_reserve_pages: int, num_pages: int) -> None:
    """ConfigError unless prefill admission, which leaves `decode_reserve_pages` of the KV pool's `num_pages` free
    and then needs a page for the request, can ever admit one."""
    if decode_reserve_pages >= num_pages:
        raise ConfigError(f"decode_reserve_pages ({decode_reserve_pages}) must be less than the KV cache's "
                          f"{num_pages} pages: prefill admission leaves that many free, so no request could start")


@dataclass(frozen=True)
class SLOConfig:
    """Latency targets and the engine-side SLO features (actors.slo).

    `order`: prefill admission order, `fcfs` or `edf` (earliest deadline first: a
    request's own deadline, else arrival + `ttft_ms`; waiting `aging_s` or more, default
    2 x `ttft_ms`, promotes it). `admission`: predict each new request's TTFT and,
    past `admission_slack` x its target, `reject` it (AdmissionRejected, HTTP 429) or
    `queue` it at the lowest priority, for `aging_s` at most under either order
    (`actors.slo.ordering`). `latency_profile`: JSON file of latency models,
    loaded (or profiled at start and saved) when admission is on.
    """

    ttft_ms: float = 1000.0
    tpot_ms: float = 50.0
    order: str = "fcfs"
    aging_s: float | None = None
    admission: bool = False
    admission_slack: float = 1.0
    admission_action: str = "reject"
    latency_profile: str | None = None

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0 or self.tpot_ms <= 0:
            raise ConfigError(f"SLO targets must be positive, got ttft_ms={self.ttft_ms} tpot_ms={self.tpot_ms}")
        if self.order not in PREFILL_ORDERS:
            raise ConfigError(f"order must be one of {PREFILL_ORDERS}, got {self.order!r}")
        if self.aging_s is not None and self.aging_s <= 0:
            raise ConfigError(f"aging_s must be positive, got {self.aging_s}")
        if self.admission_slack <= 0:
            raise ConfigError(f"admission_slack must be positive, got {self.admission_slack}")
        if self.admission_action not in ("reject", "queue"):
            raise ConfigError(f"admission_action must be 'reject' or 'queue', got {self.admission_action!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine (one GPU, or the CPU) needs to start.

    `mode`: `unified` runs one loop that piggybacks decodes on chunked prefill;
    `semi-pd` runs a prefill worker and a decode worker concurrently, each on its own
    SM partition (on CPU: its own thread), over one KV pool; `disagg` (the DistServe-style
    baseline, `actors.disagg`) runs a prefill-only engine on the first GPU and a decode-only
    engine on the second (on CPU: both on the CPU), each with its own KV pool, the KV of each
    finished prefill copied across.
    `prefill_sms`: SMs given to prefill at start in semi-pd mode (None: about half).
    `decode_attention`: flashinfer's kernel for decode attention: `fa2` or `fa3` (tensor cores), `cuda-cores`.
    `splits`: the prefill SM counts a semi-pd engine creates partitions (and decode CUDA
    graphs) for, each rounded to the nearest one the GPU allows (None: all of them).
    `overlap_decode`: the decode worker queues its next step before the current one's
    tokens reach the host (see `actors.engine.workers.DecodeWorker`; in unified mode every
    batch, mixed ones too, `UnifiedWorker`); `overlap_prefill`: the
    semi-pd prefill worker schedules its next iteration and makes its attention plan while the
    current one runs, and queues its kernels once the current one has ended
    (`actors.engine.workers.PrefillWorker`).
    `decode_pace_ms`: semi-pd: while prefill has work, the decode worker starts at most one step per
    this many ms (`actors.engine.pacing.StepPacer`), leaving prefill the bandwidth that back-to-back steps
    would take; set it under the TPOT target. None: steps run back to back.
    `prefill_layers_ahead`: semi-pd on a GPU: the prefill worker queues at most this many decoder layers of an
    iteration ahead of its partition (`actors.runner.launch_window.LaunchWindow`), so that its kernels do not fill
    CUDA's launch queue, which the decode worker's launches share. 0: an iteration's kernels are queued at once.
    The default, 8, kept 1-3 points more of chat at 37-38.5 req/s than 0 on one H100 (serving's run 46).
    `switch_interval_ms`: Python's thread switch interval (`sys.setswitchinterval`) the engine
    sets for its whole process when it starts. Its workers and the thread that streams tokens
    share one interpreter lock, and a thread back from a GPU wait may wait this long for it
    (Python's default: 5 ms). None leaves the interpreter's setting.
    `tokenizer_eos_token_id`: the tokenizer's `eos_token_id`, which ends every request (unless `ignore_eos`) besides
    the EOS ids of config.json and generation_config.json, as in vLLM. The front ends, which load the tokenizer, set
    it; an engine alone (None) stops on the checkpoint's ids only, as vLLM does without a tokenizer.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    mode: str = "unified"
    attention_backend: str = "auto"
    decode_attention: str = "fa2"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prefill_sms: int | None = None
    splits: tuple[int, ...] | None = None
    cuda_graphs: bool = True
    overlap_decode: bool = True
    overlap_prefill: bool = True
    decode_pace_ms: float | None = None
    prefill_layers_ahead: int = 8
    switch_interval_ms: float | None = None
    load_format: str = "auto"  # "dummy": random weights drawn on the device, no checkpoint read
    slo: SLOConfig = field(default_factory=SLOConfig)
    tokenizer_eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ENGINE_MODES:
            raise ConfigError(f"mode must be one of {ENGINE_MODES}, got {self.mode!r}")
        if self.attention_backend not in ("auto", *ATTENTION_BACKENDS):
            raise ConfigError(
                f"attention_backend must be one of {('auto', *ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        if self.decode_attention not in DECODE_ATTENTION:
            raise ConfigError(f"decode_attention must be one of {DECODE_ATTENTION}, got {self.decode_attention!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.dtype != "auto" and DTYPES[self.dtype] == torch.float32 and self.resolved_backend == "flashinfer":
            raise ConfigError(f"dtype {self.dtype} is not supported on the GPU (flashinfer's attention runs float16 "
                              "and bfloat16 only): use auto (bfloat16), bfloat16 or float16")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.switch_interval_ms is not None and not 0 < self.switch_interval_ms <= 1000:
            raise ConfigError(f"switch_interval_ms must be in (0, 1000], got {self.switch_interval_ms}")
        if self.decode_pace_ms is not None and not 0 < self.decode_pace_ms <= 1000:
            raise ConfigError(f"decode_pace_ms must be in (0, 1000], got {self.decode_pace_ms}")
        if self.prefill_layers_ahead < 0:
            raise ConfigError(f"prefill_layers_ahead must be 0 (off) or more, got {self.prefill_layers_ahead}")
        if self.splits is not None and (not self.splits or min(self.splits) < 1):
            raise ConfigError(f"splits must be positive SM counts, got {self.splits}")
        if not Path(self.model).is_dir():
            raise ConfigError(f"model directory not found: {self.model}")

    @property
    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def resolved_backend(self) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "flashinfer" if self.resolved_device.type == "cuda" else "torch"

    def torch_dtype(self, arch: ModelArch) -> torch.dtype:
        """`auto`: bf16 on GPU, the checkpoint's dtype (fp32 if unknown) on CPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.resolved_device.type == "cuda":
            return torch.bfloat16
        return DTYPES.get(arch.checkpoint_dtype, torch.float32)

    def max_model_len(self, arch: ModelArch) -> int:
        """The user's max_model_len, else max_position_embeddings. A model with sliding-window layers runs with full
        attention, so its context is capped at the window (as vLLM does with its sliding window disabled): there
        the two attend to the same tokens. ConfigError for a max_model_len past either (vLLM's refusal too)."""
        wanted = self.scheduler.max_model_len
        if wanted is not None and wanted > arch.max_position_embeddings:
            raise ConfigError(f"max_model_len {wanted} exceeds the model's max_position_embeddings "
                              f"{arch.max_position_embeddings}")
        window = arch.sliding_window
        if window is None or window >= arch.max_position_embeddings:
            return self.scheduler.max_model_len or arch.max_position_embeddings
        if self.scheduler.max_model_len is not None:
            if self.scheduler.max_model_len > window:
                raise ConfigError(
                    f"max_model_len {self.scheduler.max_model_len} exceeds the model's sliding_window {window}: "
                    "sliding-window attention is not implemented, so the context is limited to the window"
                )
            return self.scheduler.max_model_len
        log.warning("%s uses sliding-window attention (sliding_window=%d), which this engine does not implement: "
                    "max_model_len capped from %d to %d", arch.architecture, window, arch.max_position_embeddings,
                    window)
        return window
