"""Grammars of structured outputs, on llguidance (vLLM's `guidance` backend; no dependency beyond its wheel).

`GrammarCompiler` (one per engine) turns a request's `StructuredOutputsParams` into a `Grammar`: the request's
matcher, advanced by each token it takes (`accept`). Before a draw the sampler gets the bitmasks of the tokens
that may come next for the batch's grammars (`fill_bitmasks`, on the host) and masks the logits with them on
their device (`mask_logits`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from actors.request import SamplingParamsError, StructuredOutputsParams

log = logging.getLogger(__name__)


def grammar_error(spec: StructuredOutputsParams) -> str | None:
    """What is wrong with `spec`'s grammar, found without a tokenizer (an unknown keyword, an unsatisfiable schema),
    or None; None also where llguidance is missing (the engine says so)."""
    try:
        import llguidance
    except ImportError:
        return None
    try:
        source = grammar_source(spec)
    except ValueError as e:
        return str(e)
    return _first_lines(llguidance.LLMatcher.validate_grammar(source)) or None


def grammar_source(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for `spec` (checked when a matcher is built on it, `GrammarCompiler.compile`)."""
    import llguidance

    options = {"whitespace_flexible": not spec.disable_any_whitespace}
    if spec.json is not None:
        schema = spec.json.strip()
        if schema == "false":  # JSON Schema's schema no value matches (and `true`, any value: `{}`)
            raise ValueError("the JSON schema false admits no output")
        return llguidance.LLMatcher.grammar_from_json_schema("{}" if schema == "true" else schema, defaults=options)
    if spec.json_object:
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=options)
    if spec.regex is not None:
        _check_regex(spec.regex)
        return llguidance.grammar_from("regex", spec.regex)
    if spec.choice is not None:
        return llguidance.grammar_from("choice", json.dumps(list(spec.choice)))
    assert spec.grammar is not None
    return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF (converted)


def _check_regex(regex: str) -> None:
    """ValueError for a regex that ends in an unfinished escape (a lone `\\`), invalid in every dialect:
    llguidance's `grammar_from` drops it unseen (`a\\` would match `a`, `\\` the empty text)."""
    trailing = len(regex) - len(regex.rstrip("\\"))
    if trailing % 2:
        raise ValueError(f"regex {regex!r} ends with an unfinished escape (a lone backslash)")


class Grammar:
    """One request's matcher: the tokens allowed next, and the tokens taken so far. Used by the worker that owns
    the request only. With `start_after` it holds (`active`) only once the output has had those tokens."""

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 start_after: Sequence[int] = ()) -> None:
        self.matcher = matcher
        self.bitmask_words = (vocab_size + 31) // 32  # the width of a bitmask row
        self._eos = frozenset(eos_token_ids)
        self._trigger = tuple(start_after)
        self._recent: deque[int] = deque(maxlen=len(self._trigger))
        self.active = not self._trigger

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; True when the output ends with it: the grammar is complete (nothing but EOS may
        follow), or the token broke it (only if the mask was not applied: logged). Before the grammar holds, a token
        only moves it toward `start_after`."""
        if not self.active:
            self._recent.append(token_id)
            self.active = tuple(self._recent) == self._trigger
            return False
        if self.matcher.is_stopped():  # complete before this token: it can only be EOS
            return True
        if not self.matcher.consume_token(token_id):
            log.warning("a token the grammar does not allow was drawn (%d): %s", token_id, self.matcher.get_error())
            return True
        return self.matcher.is_stopped() or token_id in self._eos

    def accept_all(self, token_ids: Sequence[int]) -> None:
        """Advance past tokens already generated (a request arriving with output, from another engine)."""
        for t in token_ids:
            if self.accept(t):
                break


_EXECUTOR: Any = None
_EXECUTOR_LOCK = threading.Lock()


def fill_bitmasks(grammars: Sequence[Grammar]) -> torch.Tensor:
    """The tokens each grammar allows next: row k of the result [R, bitmask_words] (int32, on the host; bit t % 32 of
    word t // 32 set: token t allowed) is `grammars[k]`'s. Once a grammar is complete only EOS is allowed. The rows
    are filled in parallel on llguidance's threads (one process-wide pool), without the interpreter lock."""
    global _EXECUTOR
    import llguidance

    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor()
    words = grammars[0].bitmask_words
    assert all(g.bitmask_words == words for g in grammars), "one model's grammars share a vocabulary"
    bitmask = torch.empty((len(grammars), words), dtype=torch.int32)
    _EXECUTOR.unsafe_compute_mask_ptr([(g.matcher, k) for k, g in enumerate(grammars)], bitmask.data_ptr(),
                                      words * 4, len(grammars))
    return bitmask


class GrammarCompiler:
    """Builds `Grammar`s for one model's tokenizer; thread-safe. Wrapping the tokenizer takes ~1 s for a 128K
    vocabulary: `prepare_in_background` does it before the first structured request needs it (the request is
    compiled where it is added, in a server's event loop)."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> Grammar:
        """A fresh matcher for `spec`; SamplingParamsError (naming the mistake) if the grammar is invalid."""
        try:
            import llguidance
        except ImportError:
            raise SamplingParamsError("structured_outputs needs the llguidance package, which this server lacks") \
                from None
        try:
            source = grammar_source(spec)
        except ValueError as e:
            raise SamplingParamsError(f"structured_outputs is invalid: {e}") from None
        try:
            tokenizer = self._llg_tokenizer()
        except OSError as e:
            raise SamplingParamsError(f"structured_outputs needs the model's tokenizer: {e}") from None
        matcher = llguidance.LLMatcher(tokenizer, source, log_level=0)
        if matcher.is_error():
            raise SamplingParamsError(f"structured_outputs is invalid: {_first_lines(matcher.get_error())}")
        matcher.compute_bitmask()  # the first draw's mask (kept for it): a grammar no text matches fails here
        if matcher.is_error():  # else the output would end at once, empty, saying nothing
            raise SamplingParamsError("structured_outputs admits no output: no text matches its grammar")
        return Grammar(matcher, tokenizer.vocab_size, self.eos_token_ids, spec.start_after)

    def prepare_in_background(self) -> None:
        """Wrap the tokenizer on a thread of its own; a failure (no llguidance, no tokenizer) is left for the first
        structured request to report."""
        def prepare() -> None:
            try:
                self._llg_tokenizer()
            except Exception as e:
                log.info("structured outputs not prepared: %s", e)

        threading.Thread(target=prepare, name="grammar-tokenizer", daemon=True).start()

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(str(self.model_dir))
                n_vocab = max(self.vocab_size, len(hf))
                self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=n_vocab, eos_token=list(self.eos_token_ids))
            return self._tokenizer


def _first_lines(message: str, n: int = 4) -> str:
    return "\n".join(message.strip().splitlines()[:n])


def mask_logits(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` [N, V] with each token that `bitmask[r]` [R, W] (int32, on the logits' device, W * 32 >= V) does not
    allow set to -inf in row `rows[r]`; the other rows unchanged."""
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    words = bitmask.view(torch.uint8)  # [R, 4W], little-endian: byte k of word w holds tokens 32w + 8k ..
    allowed = ((words[:, :, None] >> shifts) & 1).bool().flatten(1)[:, : logits.shape[1]]  # [R, V]
    out = logits.clone()
    out[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return out
