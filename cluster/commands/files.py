"""Command-line values that name a file or hold its text."""

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
