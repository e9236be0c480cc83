"""Command-line values that name a file or hold its text, and torch devices."""

from __future__ import annotations

from pathlib import Path


def text_or_file(value: str) -> tuple[str, bool]:
    """(the file's contents, True) when `value` names a file, else (`value`, False): a grammar, a schema or a
    pattern given inline or as a path."""
    try:
        path = Path(value)
        if "\n" not in value and path.is_file():
            return path.read_text(), True
    except (OSError, ValueError):  # a name too long for a path, or a NUL in it
        pass
    return value, False


def check_device(value: str) -> None:
    """ValueError (the CLI exits 2) unless `value` is `auto` or a torch device this machine has: `cpu`, `cuda`,
    `cuda:N` with N below the GPU count, ... (for commands that run the model in this process)."""
    if value == "auto":
        return
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"--device {value!r} is not a torch device (auto, cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {value}: no CUDA device is available here")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {value}: this machine has {count} CUDA device(s)")
