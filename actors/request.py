"""Request state and sampling parameters.

A request's progress is counters, not phases: `num_computed_tokens` of
`len(token_ids)` (prompt followed by the generated tokens). While more than one token
is uncomputed it needs prefill (chunks of any size); with exactly one uncomputed token
(the last sampled) it needs a decode step. Preemption resets the counter to 0, and the
request is recomputed by prefill, generated tokens included.
"""

from __future__ import annotations

import enum
import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.structured import Grammar


MIN_TEMPERATURE = 1e-2  # a smaller positive temperature is raised to this (vLLM's _MAX_TEMP): logits / 1e-40 overflow


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; the message names it (HTTP 400, CLI exit 2)."""


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away or asked to stop
    ERROR = "error"  # the engine failed this request


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match (vLLM's `structured_outputs`): exactly one of a JSON schema (`json`, a dict is
    accepted and kept serialized), a regular expression, a list of `choice`s, a `grammar` (Lark or GBNF), or
    `json_object` (any JSON object). `disable_any_whitespace`: JSON without whitespace between its tokens
    (default: the model may place whitespace where JSON allows it). `start_after` (semipd's): the grammar holds only
    once the output has had these tokens, unconstrained until then; a server with a reasoning parser sets it to a
    reasoning model's end of thinking (`</think>`), as vLLM applies the grammar after the reasoning.
    A grammar's mistakes are found when the engine compiles it (`actors.structured`), also a
    SamplingParamsError."""

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False
    start_after: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "start_after", tuple(self.start_after))
        if not all(isinstance(t, int) and t >= 0 for t in self.start_after):
            raise SamplingParamsError("structured_outputs start_after must be token ids")
        if self.json is not None and not isinstance(self.json, str):
            object.__setattr__(self, "json", json.dumps(self.json))  # key order kept: properties come in it
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise SamplingParamsError("structured_outputs needs exactly one of json, regex, choice, grammar and "
                                      f"json_object, got {', '.join(given) or 'none'}")
        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise SamplingParamsError(f"structured_outputs json is not valid JSON: {e}") from None
            except RecursionError:
                raise SamplingParamsError("structured_outputs json is nested too deeply") from None
            if not isinstance(schema, (dict, bool)):
                raise SamplingParamsError("structured_outputs json must be a JSON schema (an object)")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise SamplingParamsError("structured_outputs choice must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise SamplingParamsError(f"structured_outputs {name} must be a non-empty string")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop (vLLM/OpenAI semantics).

    temperature 0 means greedy; one in (0, 0.01) is raised to 0.01, as vLLM does. top_k 0 (or -1) and top_p 1
    disable those filters. seed -1 means no seed (vLLM's).
    `logprobs`: None for none, n >= 0 for the chosen token's logprob plus the top n.
    `cache_salt` (vLLM's request field, carried here with the other per-request options):
    the request's prompt pages are cached under this salt, so only requests with the same
    salt share prefix-cache hits (tenants cannot probe each other's prompts by timing).
    `logit_bias` (OpenAI's): (token id, bias in [-100, 100]) pairs added to the logits before
    any token is picked, greedy included; a mapping is accepted and kept as sorted pairs.
    `prompt_logprobs` (vLLM's): None for none, n >= 0 for the logprob of every prompt token after the
    first, given those before it, plus the top n; such a request's prompt is computed whole (no
    prefix-cache hits), as in vLLM.
    `allowed_token_ids` (vLLM's): only these tokens may be picked (None: any). A step at which it and the other masks
    (the structured output's, min_tokens') leave no token ends the request with finish reason error, naming them.
    `structured_outputs` (vLLM's): the output matches a JSON schema, regex, choice or grammar; it ends (finish
    reason stop) once the grammar is complete, whatever `min_tokens` and `ignore_eos` say.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only (no text, no stop strings)
    cache_salt: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: int | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if isinstance(self.structured_outputs, Mapping):
            fields = set(StructuredOutputsParams.__dataclass_fields__)
            self._check(set(self.structured_outputs) <= fields, "structured_outputs",
                        f"takes only {', '.join(sorted(fields))}")
            object.__setattr__(self, "structured_outputs", StructuredOutputsParams(**self.structured_outputs))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.seed == -1:  # vLLM's "no seed"
            object.__setattr__(self, "seed", None)
        if _finite(self.temperature) and 0.0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        self._check(self.max_tokens >= 1, "max_tokens", "must be at least 1")
        self._check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]")
        self._check(_finite(self.temperature) and 0.0 <= self.temperature <= 2.0, "temperature", "must be in [0, 2]")
        self._check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        self._check(self.top_k >= 0, "top_k", "must be -1, 0 (disabled) or positive")
        self._check(_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        self._check(_finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        self._check(_finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        self._check(_finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        self._check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]")
        self._check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
                    "must be in [0, 20]")
        self._check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        self._check(self.detokenize or not self.stop, "stop", "needs detokenize=True")
        self._check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative integers")
        self._check(self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt != ""),
                    "cache_salt", "must be a non-empty string if given")
        self._check(all(isinstance(t, int) and t >= 0 for t, _ in self.logit_bias), "logit_bias",
                    "keys must be token ids (non-negative integers)")
        self._check(all(_finite(b) and -100.0 <= b <= 100.0 for _, b in self.logit_bias), "logit_bias",
                    "values must be in [-100, 100]")
        self._check(len({t for t, _ in self.logit_bias}) == len(self.logit_bias), "logit_bias",
                    "names a token id twice")
        object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias)))
        allowed = self.allowed_token_ids
        self._check(allowed is None or (bool(allowed) and all(isinstance(t, int) and t >= 0 for t in allowed)),
                    "allowed_token_ids", "must be a non-empty list of token ids (non-negative integers)")

    @staticmethod
    def _check(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise SamplingParamsError(f"{name} {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise SamplingParamsError if a token id the parameters name is outside the vocabulary."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("allowed_token_ids",
                                                                          self.allowed_token_ids or ())):
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise SamplingParamsError(f"{name} token ids must be in [0, {vocab_size}), got {bad}")

    def check_first_token(self, eos_token_ids: Sequence[int]) -> None:
        """Raise SamplingParamsError if no first token can satisfy these parameters: every allowed token is an EOS
        or stop token, which `min_tokens` bars while no structured output holds (the sampler's masks)."""
        grammar_decides = self.structured_outputs is not None and not self.structured_outputs.start_after
        if self.min_tokens == 0 or grammar_decides or self.allowed_token_ids is None:
            return
        if set(self.allowed_token_ids) <= {*eos_token_ids, *self.stop_token_ids}:
            raise SamplingParamsError("allowed_token_ids holds only EOS and stop tokens, which min_tokens bars from "
                                      "the first token: no token satisfies both")

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


PENDING_TOKEN = -1  # the place of a token whose decode step is still running (overlapped decode)


@dataclass(eq=False)
class Request:
    """One generation, shared by the schedulers; mutated only by the worker that owns it.

    Ownership moves prefill -> decode on handoff and decode -> prefill on preemption.
    Other threads only call `abort()`; the owner frees the pages at its next boundary.
    """

    request_id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 30
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # scheduling class, lower first: `requested_priority`, or lower while admission holds it back
    # (`actors.slo.ordering.ordered_priority`: at most the aging bound after `arrival_time`)
    deadline: float | None = None  # time.monotonic() by which the first token is due
    requested_priority: int = 0  # the caller's (vLLM's `priority`)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)
    num_published_pages: int = 0  # leading pages handed to the prefix cache
    num_preemptions: int = 0
    first_token_time: float | None = None
    admission_ttft_ms: float | None = None  # the TTFT admission control predicted on admitting it at its own priority
    finish_reason: FinishReason | None = None
    generator: Any = None  # torch.Generator for seeded sampling
    grammar: Grammar | None = None  # what the output must match, at the tokens so far (`structured_outputs`)
    prompt_logprobs: list[Any] = field(default_factory=list)  # `TokenLogprobs` of prompt tokens 1.. so far
    _abort_reason: FinishReason | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_uncomputed > 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def scores_prompt(self) -> bool:
        """Whether prompt logprobs are asked for and still to compute: they go out with the first token, so a
        prompt computed again later (a preemption, the decode engine of a disaggregated pair) scores nothing."""
        return (self.params.prompt_logprobs is not None and self.num_output_tokens == 0
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    def abort(self, reason: FinishReason = FinishReason.ABORT) -> None:
        """Ask the owning worker to stop this request at its next iteration boundary."""
        with self._lock:
            if self._abort_reason is None:
                self._abort_reason = reason

    @property
    def abort_requested(self) -> FinishReason | None:
        return self._abort_reason

    def append_token(self, token_id: int) -> FinishReason | None:
        """Record a sampled token; return why the request ends with it, if it does."""
        self.token_ids.append(token_id)
        return self._finish_reason(len(self.token_ids) - 1)

    def append_pending(self) -> int:
        """Hold the place of the token a launched, not yet finished, step will produce; its index."""
        self.token_ids.append(PENDING_TOKEN)
        return len(self.token_ids) - 1

    def resolve_pending(self, index: int, token_id: int) -> FinishReason | None:
        """Put the token of the place `append_pending` gave; return why the request ends with it, if it does."""
        assert self.token_ids[index] == PENDING_TOKEN, "resolving a token that is not pending"
        self.token_ids[index] = token_id
        return self._finish_reason(index)

    def drop_pending(self) -> None:
        """Forget trailing pending places (their steps' results are discarded)."""
        while self.token_ids and self.token_ids[-1] == PENDING_TOKEN:
            self.token_ids.pop()

    @property
    def grammar_holds(self) -> bool:
        """Whether a grammar decides the next token (structured outputs, past any `start_after`)."""
        return self.grammar is not None and self.grammar.active

    def is_stop_token(self, token_id: int) -> bool:
        """Whether `token_id` is an EOS or stop token: when it ends the request, its text is not part of the output."""
        return token_id in self.eos_token_ids or token_id in self.params.stop_token_ids

    def ends_by_length_at(self, num_tokens: int) -> bool:
        """Whether the request stops for length once it holds `num_tokens` tokens (known before sampling)."""
        return num_tokens - self.num_prompt_tokens >= self.params.max_tokens or num_tokens >= self.max_model_len

    def _finish_reason(self, index: int) -> FinishReason | None:
        token_id = self.token_ids[index]
        n_out = index + 1 - self.num_prompt_tokens
        if n_out == 1:
            self.first_token_time = time.monotonic()
        if self.grammar is not None and self.grammar.accept(token_id):
            return FinishReason.STOP
        if n_out >= self.params.min_tokens:
            if not self.params.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP
            if token_id in self.params.stop_token_ids:
                return FinishReason.STOP
        if self.ends_by_length_at(index + 1):
            return FinishReason.LENGTH
        return None


@dataclass(frozen=True)
class TokenDelta:
    """What one engine iteration produced for one request (the core's only output)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    logprobs: tuple[Any, ...] = ()  # one `TokenLogprobs` per new token when asked
    prompt_logprobs: tuple[Any, ...] = ()  # with the first token, when asked: `TokenLogprobs` of prompt tokens 1..
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    ends_with_stop_token: bool = False  # the last new token is the EOS or stop token that ended the request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
