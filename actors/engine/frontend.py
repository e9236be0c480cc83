"""Front ends of one engine: text in and out, stop strings, streaming.

`LLM` is the offline (blocking) API, `AsyncLLM` the asyncio one used by the Ray actor.
Both put `EngineCore` behind a tokenizer and an `OutputStream` per request that turns
token deltas into text deltas (incremental detokenization, stop strings with the
text held back that might start one). When a stop string matches, the request is
aborted in the core so its pages come back at once.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from actors.config import ConfigError, EngineConfig, generation_defaults
from actors.engine.core import EngineCore
from actors.engine.workers import Emit
from actors.request import FinishReason, SamplingParams, TokenDelta
from actors.runner.sampler import TokenLogprobs

Prompt = str | Sequence[int]


class Tokenizer:
    """The checkpoint's tokenizer (tokenizer.json / tokenizer_config.json) and chat template."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file() and not (d / "tokenizer_config.json").is_file():
            raise ConfigError(f"{model_dir}: no tokenizer.json or tokenizer_config.json")
        self.hf = AutoTokenizer.from_pretrained(str(d))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """The chat template applied to `messages` (and `tools`, which the template describes to the model), as
        text. The template writes its own special tokens (a BOS among them), so the text is encoded without
        adding any (`chat_ids`)."""
        if not messages:
            raise ValueError("messages must not be empty")
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model has no chat template")
        return self.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, tokenize=False,
                                           **(template_kwargs or {}))

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids of `messages` through the chat template, with no special token added to the template's."""
        return self.encode(self.chat_prompt(messages), add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id


@dataclass(frozen=True)
class StreamChunk:
    """New output of one request: text and token ids since the last chunk."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # with the first token, when asked: prompt tokens 1..
    # vLLM's `stop_reason`, with the finish reason "stop": the stop string matched, or the stop token id that ended
    # the request (None for the tokenizer's EOS, as in vLLM, where other EOS ids of the checkpoint are stop tokens)
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def followed_by(self, later: StreamChunk) -> StreamChunk:
        """This chunk and the `later` one of the same request as one chunk."""
        return replace(later, text=self.text + later.text, token_ids=self.token_ids + later.token_ids,
                       logprobs=self.logprobs + later.logprobs,
                       prompt_logprobs=self.prompt_logprobs + later.prompt_logprobs,
                       num_cached_tokens=later.num_cached_tokens or self.num_cached_tokens,
                       error=later.error or self.error)


@dataclass
class CompletionOutput:
    """The whole result of one request (offline API)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1.. (`prompt_logprobs`)
    stop_reason: str | int | None = None  # as StreamChunk's

    def add(self, chunk: StreamChunk) -> None:
        self.token_ids.extend(chunk.token_ids)
        self.text += chunk.text
        self.logprobs.extend(chunk.logprobs)
        self.prompt_logprobs.extend(chunk.prompt_logprobs)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.num_cached_tokens = chunk.num_cached_tokens or self.num_cached_tokens
        self.error = chunk.error or self.error
        if chunk.stop_reason is not None:
            self.stop_reason = chunk.stop_reason


PROMPT_CONTEXT_TOKENS = 5  # prompt tokens the output is decoded after (vLLM's initial detokenization offset)


class OutputStream:
    """Token deltas -> text deltas for one request; finds stop strings."""

    def __init__(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, tokenizer: Tokenizer) -> None:
        self.request_id = request_id
        self.params = params
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        # the last prompt tokens, as the context the output is decoded in (a tokenizer that drops a word's leading
        # space at the start of a text, as SentencePiece's, keeps the first output word's), then the output tokens
        # whose text is shown; the context is taken with the first delta (the engine has checked the prompt then)
        self.ids: list[int] = []
        self._has_context = not params.detokenize
        self.num_output_tokens = 0
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # decoded so far (stop string cut applied)
        self._emitted = 0  # chars of `text` already sent
        # chars that may start a stop string to cut off are held back; one to include takes nothing back (vLLM's)
        self._holdback = 0 if params.include_stop_str_in_output else max((len(s) for s in params.stop), default=1) - 1
        self._stop_floor = 0  # the text of the first `min_tokens` tokens: no stop string may end within it
        self.stop_reason: str | int | None = None
        self.done = False
        self.metrics = RequestTimes(arrival=time.monotonic())

    def _prompt_context(self) -> list[int]:
        """The last PROMPT_CONTEXT_TOKENS prompt tokens, less a tail that decodes to an incomplete character."""
        context = self.prompt_ids[-PROMPT_CONTEXT_TOKENS:]
        while context and self.tokenizer.decode(context, self.params.skip_special_tokens).endswith("\ufffd"):
            context.pop()
        return context

    def _decode_window(self, end: int) -> str:
        """The text of the tokens from the prefix offset up to `end`."""
        return self.tokenizer.decode(self.ids[self._prefix_offset : end], self.params.skip_special_tokens)

    def _decode_new(self) -> str:
        before = self._decode_window(self._read_offset)
        after = self._decode_window(len(self.ids))
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def _flush_partial(self) -> tuple[str, str]:
        """At the end, the text of the tokens still held back, in two parts: what they decode to up to the last of
        them after which the text does not end in U+FFFD (decoded text), and the rest: the incomplete character(s)
        the output ends on, as U+FFFD, which later tokens would have completed (no text a stop string may match)."""
        before = self._decode_window(self._read_offset)
        complete = len(self.ids)
        after = whole = self._decode_window(complete)
        while complete > self._read_offset and whole.endswith("\ufffd"):
            complete -= 1
            whole = self._decode_window(complete)
        self._prefix_offset = self._read_offset = len(self.ids)
        return whole[len(before) :], after[len(whole) :]

    def process(self, delta: TokenDelta) -> tuple[StreamChunk, bool]:
        """Returns the chunk to send and whether a stop string ended the request here."""
        assert not self.done
        now = time.monotonic()
        new_ids = delta.new_token_ids
        if new_ids:
            self.metrics.token_times.append(now)
        if not self._has_context:
            self.ids = self._prompt_context()
            self._read_offset = len(self.ids)
            self._has_context = True
        count = self.num_output_tokens
        self.num_output_tokens += len(new_ids)
        shown = new_ids
        if delta.ends_with_stop_token and not self.params.include_stop_str_in_output:
            shown = new_ids[:-1]  # its text is not shown
        start = len(self.text)  # stop strings must end past here (earlier text was searched)
        new_text = ""
        for t in shown:  # one token at a time: where the text of the first min_tokens tokens ends is known
            self.ids.append(t)
            count += 1
            if self.params.detokenize:
                new_text += self._decode_new()
                if count <= self.params.min_tokens:
                    self._stop_floor = start + len(new_text)
        incomplete = ""
        if self.params.detokenize and delta.finished:
            flushed, incomplete = self._flush_partial()
            new_text += flushed
        self.text += new_text
        finish = delta.finish_reason.value if delta.finish_reason else None
        stopped = False
        if self.params.stop and new_text and self.num_output_tokens > self.params.min_tokens:
            hit = _find_stop(self.text, self.params.stop, max(start, self._stop_floor),
                             self.params.include_stop_str_in_output)
            if hit is not None:
                cut, self.stop_reason = hit
                self.text = self.text[:cut]
                finish, stopped = FinishReason.STOP.value, True
        if not stopped:
            self.text += incomplete
        if finish == FinishReason.STOP.value and not stopped and delta.ends_with_stop_token and new_ids:
            token = new_ids[-1]  # vLLM's: a stop token's id; None for the EOS (unless ignore_eos made it one)
            if self.params.ignore_eos or token != self.tokenizer.eos_token_id:
                self.stop_reason = token
        end = len(self.text) if finish else max(self._emitted, len(self.text) - self._holdback)
        out_text = self.text[self._emitted : end]
        self._emitted = end
        self.done = finish is not None
        if self.done:
            self.metrics.finish = now
        chunk = StreamChunk(
            request_id=self.request_id,
            text=out_text,
            token_ids=tuple(delta.new_token_ids),
            finish_reason=finish,
            logprobs=tuple(delta.logprobs),
            prompt_logprobs=tuple(delta.prompt_logprobs),
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
            num_cached_tokens=delta.num_cached_tokens,
            error=delta.error,
            stop_reason=self.stop_reason if self.done else None,
        )
        return chunk, stopped


def _put_all(items: list[tuple[asyncio.Queue[TokenDelta], TokenDelta]]) -> None:
    for q, d in items:
        q.put_nowait(d)


def _find_stop(text: str, stops: Sequence[str], after: int, include: bool) -> tuple[int, str] | None:
    """Where to cut `text` for the earliest stop string that ends past offset `after`, and that string."""
    hits = [(i, len(s), s) for s in stops if (i := text.find(s, max(0, after - len(s) + 1))) != -1]
    if not hits:
        return None
    i, n, s = min(hits)
    return (i + n if include else i), s


@dataclass
class RequestTimes:
    """Monotonic timestamps of one request, for TTFT / TPOT / E2E latency."""

    arrival: float
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


def make_core(config: EngineConfig, emit: Emit) -> EngineCore:
    """The engine of `config.mode`: an `EngineCore`, or for `disagg` a `DisaggPair` (the same request API)."""
    if config.mode == "disagg":
        from actors.disagg.pair import DisaggPair  # built on this package: imported when used

        return DisaggPair.serving(config, emit)  # type: ignore[return-value]
    return EngineCore(config, emit=emit)


class _Frontend:
    """Shared set-up: engine core, tokenizer, request ids, prompt handling."""

    def __init__(self, config: EngineConfig) -> None:
        self.tokenizer = Tokenizer(config.model)
        self.config = replace(config, tokenizer_eos_token_id=self.tokenizer.eos_token_id)
        self.core = make_core(self.config, self._route)
        self._counter = itertools.count()

    def _route(self, deltas: list[TokenDelta]) -> None:
        raise NotImplementedError

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, int) for t in ids):
            raise ValueError("a token-id prompt must be a list of integers")
        return ids

    def new_request_id(self) -> str:
        return f"req-{next(self._counter)}-{uuid.uuid4().hex[:8]}"

    def start(self) -> None:
        self.core.start()

    def shutdown(self) -> None:
        self.core.shutdown()


class LLM(_Frontend):
    """Offline API: `LLM(model_dir).generate(prompts, params)`; also `stream` and `chat`.

    Keyword arguments are `EngineConfig` fields (mode, dtype, device, cache, ...).
    """

    def __init__(self, model: str | Path, **kwargs: Any) -> None:
        self._sinks: dict[str, queue.Queue[list[TokenDelta]]] = {}  # request id -> where its deltas go
        self._sinks_lock = threading.Lock()
        super().__init__(EngineConfig(model=str(model), **kwargs))
        self.start()

    def _route(self, deltas: list[TokenDelta]) -> None:
        """One put per sink and engine iteration: a `generate` call's requests share a sink, so the thread that
        reads them wakes once per iteration, not once per token (it shares the interpreter lock with the engine's
        workers)."""
        batches: dict[queue.Queue[list[TokenDelta]], list[TokenDelta]] = {}  # queues hash by identity
        with self._sinks_lock:
            for d in deltas:
                sink = self._sinks.get(d.request_id)
                if sink is not None:
                    batches.setdefault(sink, []).append(d)
        for sink, batch in batches.items():
            sink.put(batch)

    def _submit(self, prompt: Prompt, params: SamplingParams,
                sink: queue.Queue[list[TokenDelta]] | None = None) -> OutputStream:
        """Queue one request; its deltas go to `sink` (default: a queue of its own)."""
        ids = self.prompt_ids(prompt)
        rid = self.new_request_id()
        stream = OutputStream(rid, ids, params, self.tokenizer)
        with self._sinks_lock:
            self._sinks[rid] = queue.Queue() if sink is None else sink
        try:
            self.core.add_request(rid, ids, params)
        except Exception:
            with self._sinks_lock:
                del self._sinks[rid]
            raise
        return stream

    def _chunks(self, stream: OutputStream) -> Iterator[StreamChunk]:
        sink = self._sinks[stream.request_id]
        try:
            while not stream.done:
                for delta in sink.get():
                    if not stream.done:
                        yield self._process(stream, delta)
        finally:
            self._forget([stream])

    def _process(self, stream: OutputStream, delta: TokenDelta) -> StreamChunk:
        chunk, stopped = stream.process(delta)
        if stopped:
            self.core.abort(stream.request_id, FinishReason.STOP)
        return chunk

    def _forget(self, streams: Sequence[OutputStream]) -> None:
        """Stop routing deltas to `streams`; abort those not finished (their reader went away)."""
        for s in streams:
            if not s.done:
                self.core.abort(s.request_id)
        with self._sinks_lock:
            for s in streams:
                self._sinks.pop(s.request_id, None)

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[CompletionOutput]:
        """Run all prompts together; returns one output per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = _broadcast(params, len(prompts), self.default_params)
        sink: queue.Queue[list[TokenDelta]] = queue.Queue()
        streams: list[OutputStream] = []
        try:
            for p, sp in zip(prompts, params_list):
                streams.append(self._submit(p, sp, sink))
        except Exception:  # one invalid prompt: none of the batch runs
            self._forget(streams)
            raise
        outputs = {s.request_id: (s, CompletionOutput(s.request_id, s.prompt_ids)) for s in streams}
        unfinished = len(streams)
        try:
            while unfinished:
                for delta in sink.get():
                    stream, out = outputs[delta.request_id]
                    if not stream.done:
                        out.add(self._process(stream, delta))
                        if stream.done:
                            unfinished -= 1
        finally:
            self._forget(streams)
        return [out for _, out in outputs.values()]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Yield text deltas of one request as they come."""
        return self._chunks(self._submit(prompt, params or self.default_params))

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> CompletionOutput:
        return self.generate([self.tokenizer.chat_ids(messages)], params)[0]

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @cached_property
    def default_params(self) -> SamplingParams:
        """What a call without parameters samples with: the checkpoint's generation_config.json defaults (vLLM's
        `get_default_sampling_params`), else SamplingParams' own; read once."""
        return SamplingParams(**generation_defaults(self.config.model))


def _broadcast(params: SamplingParams | Sequence[SamplingParams] | None, n: int, default: SamplingParams
               ) -> list[SamplingParams]:
    if params is None:
        return [default] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return list(params)


class AsyncLLM(_Frontend):
    """asyncio API: `async for chunk in llm.generate(prompt, params)`; cancelling aborts.

    A chunk carries every token that arrived since the consumer last read: one token per
    chunk while it keeps up, fewer and larger chunks (fewer Ray objects and SSE events) when not.
    """

    def __init__(self, config: EngineConfig) -> None:
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenDelta]]] = {}
        self._sinks_lock = threading.Lock()
        super().__init__(config)

    def _route(self, deltas: list[TokenDelta]) -> None:
        """Hand a step's deltas to their requests' queues: one wake-up per event loop, not per delta.

        Runs on the engine's workers, so it must not raise: the requests of an event loop that closed before
        reading their streams have no reader left, and are aborted instead."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[TokenDelta], TokenDelta]]] = {}
        with self._sinks_lock:
            for d in deltas:
                entry = self._sinks.get(d.request_id)
                if entry is not None:
                    loop, q = entry
                    by_loop.setdefault(loop, []).append((q, d))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed
                for _, d in items:
                    self._drop_sink(d.request_id)
                    if not d.finished:
                        self.core.abort(d.request_id)

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        deadline: float | None = None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """Admit the request now and return its chunks; call it on the event loop that reads them.

        Raises here, before anything runs, when the request is refused (bad prompt or
        parameters, prompt too long, request id in use). Closing the stream early aborts it.
        """
        ids = self.prompt_ids(prompt)
        rid = request_id or self.new_request_id()
        stream = OutputStream(rid, ids, params, self.tokenizer)
        q: asyncio.Queue[TokenDelta] = asyncio.Queue()
        with self._sinks_lock:
            if rid in self._sinks:
                raise ValueError(f"request id {rid!r} is already in use")
            self._sinks[rid] = (asyncio.get_running_loop(), q)
        try:
            self.core.add_request(rid, ids, params, priority=priority, deadline=deadline)
        except Exception:
            self._drop_sink(rid)
            raise
        return self._chunks(stream, q)

    async def _chunks(self, stream: OutputStream, q: asyncio.Queue[TokenDelta]) -> AsyncGenerator[StreamChunk, None]:
        rid = stream.request_id
        try:
            while not stream.done:
                chunk, stopped = stream.process(await q.get())
                while not (stream.done or q.empty()):  # tokens that came while the consumer was busy: one chunk
                    more, stopped = stream.process(q.get_nowait())
                    chunk = chunk.followed_by(more)
                if stopped:
                    self.core.abort(rid, FinishReason.STOP)
                yield chunk
        finally:
            if not stream.done:
                self.core.abort(rid)
            self._drop_sink(rid)

    def _drop_sink(self, request_id: str) -> None:
        with self._sinks_lock:
            self._sinks.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        return self.core.abort(request_id)


__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "StreamChunk", "Tokenizer", "SamplingParams"]
