"""Requests from a dataset file, as `vllm bench serve --dataset-path` reads them.

- `sharegpt`: ShareGPT's JSON (a list of `{"conversations": [{"from", "value"}, ...]}`): the first turn is the
  prompt, the second's token count the output length. Conversations are taken in a seeded random order and
  kept as vLLM keeps them: prompt and output of at least 4 tokens, a prompt of at most 1,024 and a request of
  at most 2,048 tokens.
- `custom`: JSON Lines of `{"prompt": "...", "output_tokens": N}`, `output_tokens` optional (default
  `--output-len`), in the same seeded order.

Token counts come from the run's `PromptBuilder` (exact with a tokenizer, approximate otherwise).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench.workloads import BenchRequest, PromptBuilder, WorkloadConfig, WorkloadError

SHAREGPT_MIN_TOKENS = 4
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkloadError(f"cannot read dataset {path}: {e}") from None


def sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    """(prompt, completion) of every conversation of two turns or more, in file order."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: a ShareGPT file is a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            prompt, completion = turns[0].get("value"), turns[1].get("value")
            if isinstance(prompt, str) and isinstance(completion, str):
                pairs.append((prompt, completion))
    return pairs


def custom_rows(path: Path, default_output: int) -> list[tuple[str, int]]:
    """(prompt, output tokens) of every line of a JSON Lines file."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"cannot read dataset {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{path}:{n}: not JSON: {e}") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        output = row.get("output_tokens", default_output) if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt or not isinstance(output, int) or output < 1:
            raise WorkloadError(f'{path}:{n}: expected {{"prompt": non-empty text, "output_tokens": int >= 1}}')
        rows.append((prompt, output))
    return rows


def _in_seeded_order(items: list[Any], config: WorkloadConfig) -> Iterator[Any]:
    """`items` in an order drawn from the seed and the sweep's run (each run of a sweep its own order)."""
    for i in np.random.default_rng([config.seed, config.run, 2]).permutation(len(items)):
        yield items[i]


def _sharegpt_usable(path: Path, config: WorkloadConfig, builder: PromptBuilder
                     ) -> Iterator[tuple[str, int, int, str]]:
    """(prompt, prompt tokens, output tokens, profile) of the conversations vLLM's filter keeps, in seeded order."""
    for prompt, completion in _in_seeded_order(sharegpt_pairs(path), config):
        prompt_len, output_len = builder.count(prompt), builder.count(completion)
        if (min(prompt_len, output_len) >= SHAREGPT_MIN_TOKENS and prompt_len <= SHAREGPT_MAX_PROMPT_TOKENS
                and prompt_len + output_len <= SHAREGPT_MAX_TOTAL_TOKENS):
            yield prompt, prompt_len, output_len, "sharegpt"


def _custom_usable(path: Path, config: WorkloadConfig, builder: PromptBuilder) -> Iterator[tuple[str, int, int, str]]:
    """(prompt, prompt tokens, output tokens, profile) of every line, in seeded order."""
    for prompt, output_len in _in_seeded_order(custom_rows(path, config.output_len), config):
        yield prompt, builder.count(prompt), output_len, "custom"


def dataset_requests(config: WorkloadConfig, builder: PromptBuilder) -> list[BenchRequest]:
    """`config.num_prompts` requests from `config.dataset_path`; WorkloadError if the file holds fewer usable ones."""
    path = Path(str(config.dataset_path))
    usable = (_sharegpt_usable if config.name == "sharegpt" else _custom_usable)(path, config, builder)
    requests = [BenchRequest(i, *row) for i, row in enumerate(itertools.islice(usable, config.num_prompts))]
    if len(requests) < config.num_prompts:
        raise WorkloadError(f"{path} holds {len(requests)} usable requests, fewer than --num-prompts "
                            f"{config.num_prompts}")
    return requests


__all__ = ["dataset_requests", "custom_rows", "sharegpt_pairs"]
