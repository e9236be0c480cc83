"""Reasoning in chat completions, read back from a reasoning model's text (vLLM's `--reasoning-parser`).

Reasoning models (DeepSeek-R1, QwQ, Qwen3) think inside `<think> ... </think>` before they answer. With a parser,
the text before `</think>` is the message's `reasoning` (vLLM's field, once `reasoning_content`) and the text after it
the `content`; a stream's deltas carry `reasoning` until the tag, then `content`. A tool call parser reads the content
only. The opening `<think>` may be in the output or already in the prompt (the chat template writes it), so it is
dropped where it comes, and an output that never writes `</think>` is all reasoning (cut off while thinking):

- `deepseek_r1` (DeepSeek-R1, QwQ);
- `qwen3` (Qwen3): the same, except that with `chat_template_kwargs` `enable_thinking` false the output is all
  content.

With either, a prompt that already closed its think block (`<think></think>` written by the template, thinking
off) has an output that is all content, as vLLM's server decides from the prompt's tokens. A format (structured
outputs, a forced tool call) holds from the end of the reasoning, as in vLLM: the server asks the engine to apply its
grammar only after `</think>` (`StructuredOutputsParams.start_after`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class ReasoningParser(Protocol):
    start: str  # opens the reasoning (in the output, or in the prompt the template wrote)
    end: str  # closes it: the content follows

    def thinks(self, prompt: str, template_kwargs: Mapping[str, Any]) -> bool:
        """Whether the output to `prompt` (the chat template's text, written with `template_kwargs`) opens with
        reasoning; otherwise it is all content."""
        ...


def closed_in(parser: ReasoningParser, prompt: str) -> bool:
    """Whether `prompt` ends its last think block: no reasoning comes next."""
    return prompt.rfind(parser.end) > prompt.rfind(parser.start)


class _ThinkTags:
    start = "<think>"
    end = "</think>"

    def thinks(self, prompt: str, template_kwargs: Mapping[str, Any]) -> bool:
        return not closed_in(self, prompt)


class DeepSeekR1Parser(_ThinkTags):
    """DeepSeek-R1, QwQ: reasoning unless the prompt closed the think block."""


class Qwen3Parser(_ThinkTags):
    """Qwen3: also none with `enable_thinking` false."""

    def thinks(self, prompt: str, template_kwargs: Mapping[str, Any]) -> bool:
        return bool(template_kwargs.get("enable_thinking", True)) and super().thinks(prompt, template_kwargs)


def split(parser: ReasoningParser, text: str, final: bool = True) -> tuple[str, str]:
    """(reasoning, content) of `text`, an output that opens with reasoning, without the tags; content is empty
    until `</think>`. While the output runs (`final` false) a tail that may yet become a tag is held back, so that
    each part only grows as the text does."""
    close = text.find(parser.end)
    if close != -1:
        return _without_start(parser, text[:close]), text[close + len(parser.end):]
    if not final:
        tags = (parser.end,) if parser.start in text else (parser.start, parser.end)
        text = text[:len(text) - _partial_tag(text, tags)]
    return _without_start(parser, text), ""


def _without_start(parser: ReasoningParser, reasoning: str) -> str:
    """`reasoning` without its first opening tag (the model wrote it; the text before it stays reasoning)."""
    before, tag, after = reasoning.partition(parser.start)
    return before + after if tag else reasoning


def _partial_tag(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that begins one of `tags` without being all of it."""
    return max((k for tag in tags for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)


REASONING_PARSERS: dict[str, ReasoningParser] = {"deepseek_r1": DeepSeekR1Parser(), "qwen3": Qwen3Parser()}


def reasoning_parser_named(name: str) -> ReasoningParser:
    """The parser named `name` (ValueError naming the choices otherwise)."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose from {', '.join(REASONING_PARSERS)}") from None
