"""Build a model from a Hugging Face checkpoint directory (or with random weights)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from actors.config import ConfigError, ModelArch
from actors.models.llama import CausalLM
from actors.models.ops import make_ops


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, via its index when sharded."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [d / n for n in names]
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir}: no *.safetensors weights found")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{model_dir}: weight shards listed in the index are missing: {', '.join(missing)}")
    return files


def iter_checkpoint(model_dir: str | Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def build_model(
    arch: ModelArch,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    model_dir: str | Path | None = None,
    dummy_seed: int | None = None,
    ops: str = "torch",
) -> CausalLM:
    """Instantiate on `device` in `dtype` without a random init, then fill the weights.

    With `model_dir` the checkpoint's tensors are loaded; with `dummy_seed` instead,
    random weights are drawn on the device (for speed runs that need no checkpoint).
    `ops`: the elementwise kernels, `torch` (reference) or `flashinfer` (fused, GPU).
    """
    with torch.device("meta"):
        model = CausalLM(arch, max_positions, make_ops(ops))
    model = model.to(dtype).to_empty(device=device)
    if model_dir is not None:
        model.load_weights(iter_checkpoint(model_dir, device))
    else:
        _fill_random(model, dummy_seed or 0)
    model.model.rotary.build(device)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _fill_random(model: CausalLM, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
