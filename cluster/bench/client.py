"""Streaming OpenAI requests timed per chunk, plus the server's side channels.

`send_request` posts one streaming `/v1/completions` or `/v1/chat/completions` request
(`stream_options.include_usage`, `max_tokens` or for chat `max_completion_tokens`, and `ignore_eos` only when set,
as vLLM sends them) and records TTFT, every inter-chunk gap (ITL) and the end-to-end latency with
`time.perf_counter`; as in vLLM, the latency ends at the last output chunk (not at the usage chunk or `[DONE]`
after it; `end_s` keeps the stream's end). The output token count comes from the usage (its `completion_tokens`),
else, as vLLM counts it, from the generated text through the endpoint's tokenizer when it has one, else it is the
number of chunks. Every failure (HTTP status, bad stream, disconnect, per-request timeout) ends in a record with
`success=False` and an `error`; nothing raises and nothing hangs. With a structured output
(`structured_outputs` in every body) a finished request also keeps its text and whether it conforms.

The HTTP client is aiohttp, as in `vllm bench serve`: httpx (h11, pure Python) cost 85-108 us of client CPU per
streamed chunk against a local SSE server, aiohttp 27 us. One event loop reads every stream; at the 2,100-2,900
chunks/s of chat on an H100 httpx kept it 61-85% busy, near where chunks would wait on the client.
The body is read as it comes (`iter_any`) and split into lines here: aiohttp's own line reader refuses a line
longer than its buffer (128 KiB), as a big usage or logprobs chunk can be.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from cluster.bench.structured import StructuredOutput
from cluster.bench.workloads import BenchRequest

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


class ServerError(RuntimeError):
    """The server could not be reached or answered a side request badly."""


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how to send requests.

    `base_url` is the server root (no /v1). `timeout_s` bounds each whole request.
    `extra_body` is merged into every request body (e.g. {"top_k": 1}). `structured_output`: what
    every output must match (the body's `structured_outputs`), checked when each request finishes.
    `count_tokens`: the tokens of a generated text (the benchmark's tokenizer), for streams without usage.
    """

    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    structured_output: StructuredOutput | None = None
    count_tokens: Callable[[str], int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base URL must start with http:// or https://, got {self.base_url!r}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.model:
            raise ValueError("model name must not be empty")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"request timeout must be positive, got {self.timeout_s}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def url(self) -> str:
        return self.base_url + self.endpoint

    @property
    def is_chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def build_payload(config: EndpointConfig, request: BenchRequest) -> dict[str, Any]:
    """The JSON body of one streaming request."""
    body: dict[str, Any] = {
        "model": config.model,
        "max_completion_tokens" if config.is_chat else "max_tokens": request.output_len,  # vLLM's fields
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:  # a field OpenAI's own API refuses: sent only when asked for
        body["ignore_eos"] = True
    if config.is_chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    if config.structured_output is not None:
        body["structured_outputs"] = config.structured_output.body()
    body.update(config.extra_body)
    return body


@dataclass
class RequestRecord:
    """What happened to one request. Times in seconds; `start_s`/`end_s` from the run's start."""

    index: int
    profile: str
    prompt_len: int  # intended (exact with a tokenizer)
    max_tokens: int
    scheduled_s: float = 0.0
    start_s: float = 0.0
    end_s: float = 0.0
    success: bool = False
    error: str | None = None
    http_status: int | None = None
    prompt_tokens: int | None = None  # from the server's usage
    output_tokens: int = 0
    num_chunks: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2el_s: float | None = None
    finish_reason: str | None = None
    output_text: str | None = None  # structured-output runs only: the generated text
    conforms: bool | None = None  # structured-output runs: ended with "stop" and matches; None when not checked

    @property
    def input_tokens(self) -> int:
        """Prompt tokens as the server counted them, else as intended."""
        return self.prompt_tokens if self.prompt_tokens is not None else self.prompt_len

    @property
    def tpot_s(self) -> float | None:
        """(e2el - ttft) / (output_tokens - 1), for requests with more than one token."""
        if not self.success or self.ttft_s is None or self.e2el_s is None or self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        """asdict, less the structured-output fields of a request that has none (old files read the same)."""
        data = asdict(self)
        for name in OPTIONAL_FIELDS:
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


OPTIONAL_FIELDS = ("output_text", "conforms")  # left out of a record's dict when None

DONE = object()


def parse_sse_line(line: str) -> Any:
    """One SSE line -> the decoded JSON event, DONE for `[DONE]`, None for anything else."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    if not data:
        return None
    return json.loads(data)


class StreamTimer:
    """Feeds on decoded events with their arrival time; keeps TTFT, ITL, usage, finish and the text."""

    def __init__(self, record: RequestRecord, start: float, is_chat: bool) -> None:
        self.record = record
        self.start = start
        self.is_chat = is_chat
        self.last: float | None = None
        self.done = False
        self.parts: list[str] = []

    @property
    def text(self) -> str:
        """The generated text so far (a chat's content, without reasoning)."""
        return "".join(self.parts)

    def _is_output(self, choice: dict[str, Any]) -> bool:
        if not self.is_chat:
            return True
        delta = choice.get("delta") or {}
        has_text = any(delta.get(k) for k in ("content", "reasoning", "reasoning_content"))  # vLLM's, new and old
        # the role preamble some servers send before any token is not output
        return has_text or not ("role" in delta and not choice.get("finish_reason"))

    def feed(self, event: dict[str, Any], now: float) -> None:
        if event.get("error") is not None and not event.get("choices"):  # `"error": null` is no error
            err = event["error"]
            raise ServerError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
        usage = event.get("usage")
        if usage:
            if usage.get("prompt_tokens") is not None:
                self.record.prompt_tokens = int(usage["prompt_tokens"])
            if usage.get("completion_tokens") is not None:
                self.record.output_tokens = int(usage["completion_tokens"])
        choices = event.get("choices") or []
        if not choices:
            return
        choice = choices[0]
        text = (choice.get("delta") or {}).get("content") if self.is_chat else choice.get("text")
        if isinstance(text, str):
            self.parts.append(text)
        if choice.get("finish_reason"):
            self.record.finish_reason = choice["finish_reason"]
        if not self._is_output(choice):
            return
        if self.last is None:
            self.record.ttft_s = now - self.start
        else:
            self.record.itl_s.append(now - self.last)
        self.last = now
        self.record.num_chunks += 1


async def _error_message(response: aiohttp.ClientResponse) -> str:
    body = (await response.read())[:2000].decode("utf-8", "replace")
    try:
        err = json.loads(body).get("error")
        message = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        message = None
    return f"HTTP {response.status}: {message or body.strip() or response.reason}"


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's lines (split at each newline, of any length) as their bytes arrive; the last even without one."""
    tail = b""
    async for chunk in content.iter_any():
        *lines, tail = (tail + chunk if tail else chunk).split(b"\n")
        for line in lines:
            yield line
    if tail:
        yield tail


async def _stream(client: aiohttp.ClientSession, config: EndpointConfig, request: BenchRequest,
                  record: RequestRecord, t0: float) -> None:
    start = time.perf_counter()
    record.start_s = start - t0
    timer = StreamTimer(record, start, config.is_chat)
    async with client.post(config.url, json=build_payload(config, request), headers=config.headers()) as resp:
        record.http_status = resp.status
        if resp.status != 200:
            raise ServerError(await _error_message(resp))
        async for line in _lines(resp.content):
            event = parse_sse_line(line.decode("utf-8", "replace"))
            if event is DONE:
                timer.done = True
                break
            if isinstance(event, dict):
                timer.feed(event, time.perf_counter())
    end = time.perf_counter()
    record.end_s = end - t0
    if not timer.done and record.finish_reason is None:
        raise ServerError("the stream ended before [DONE]")
    if timer.last is None:  # not one output chunk
        raise ServerError("the server returned no output")
    if record.output_tokens == 0:
        record.output_tokens = record.num_chunks if config.count_tokens is None else config.count_tokens(timer.text)
    record.e2el_s = timer.last - start  # vLLM's latency: to the last token chunk
    record.success = True
    if config.structured_output is not None:
        record.output_text = timer.text
        record.conforms = config.structured_output.conforms(timer.text, record.finish_reason)


async def send_request(client: aiohttp.ClientSession, config: EndpointConfig, request: BenchRequest,
                       t0: float, scheduled_s: float = 0.0) -> RequestRecord:
    """Send one request and time it; never raises for server or network failures.

    The error: the server's message (`HTTP <status>: ...`, or an `error` event in the stream), `timed out after
    <timeout_s> s` (the whole request), `<aiohttp error type>: ...` for a failed connection, a disconnect or a
    socket timeout of the session, and `<type>: ...` for whatever else a bad stream raises.
    """
    record = RequestRecord(request.index, request.profile, request.prompt_len, request.output_len, scheduled_s)
    try:
        async with asyncio.timeout(config.timeout_s):
            await _stream(client, config, request, record, t0)
    except ServerError as e:
        record.error = str(e)
    except aiohttp.ClientError as e:  # before TimeoutError: aiohttp's socket timeouts are both
        record.error = f"{type(e).__name__}: {e}"
    except TimeoutError:
        record.error = f"timed out after {config.timeout_s:g} s"
    except Exception as e:  # whatever odd bytes a server sends (1e999 -> inf -> int(), JSON nested too deep, ...)
        record.error = f"{type(e).__name__}: {e}"
    if not record.success:
        record.end_s = time.perf_counter() - t0
    return record


# ------------------------------------------------------------ side requests


async def fetch_models(client: aiohttp.ClientSession, base_url: str,
                       headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The server's `/v1/models` list; ServerError when it cannot be read."""
    try:
        async with client.get(base_url.rstrip("/") + "/v1/models", headers=headers or {}) as resp:
            resp.raise_for_status()
            data = json.loads(await resp.read()).get("data")
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as e:
        raise ServerError(f"cannot list models at {base_url}/v1/models: {e}") from e
    if not isinstance(data, list) or not data:
        raise ServerError(f"{base_url}/v1/models lists no model")
    if not all(isinstance(card, dict) and isinstance(card.get("id"), str) for card in data):
        raise ServerError(f"{base_url}/v1/models: its data are not model cards with an id: {str(data)[:200]}")
    return data


async def count_tokens(client: aiohttp.ClientSession, base_url: str, model: str, text: str,
                       headers: dict[str, str] | None = None) -> int | None:
    """Token count of `text` from the server's `/tokenize` (vLLM's), or None if unavailable."""
    try:
        async with client.post(base_url.rstrip("/") + "/tokenize", json={"model": model, "prompt": text},
                               headers=headers or {}) as resp:
            if resp.status != 200:
                return None
            data = json.loads(await resp.read())
        if "count" in data:
            return int(data["count"])
        return len(data["tokens"])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, AttributeError):
        return None


def parse_prometheus(text: str, prefixes: tuple[str, ...]) -> dict[str, float]:
    """Samples of the Prometheus text format whose names start with one of `prefixes`."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or not line.startswith(prefixes):
            continue
        if "}" in line:
            series, _, rest = line.rpartition("}")
            series += "}"
        else:
            series, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value):  # keep the JSON strict
            out[series.strip()] = value
    return out


async def _get_optional(client: aiohttp.ClientSession, url: str) -> bytes | None:
    """The body of GET `url`; None unless it answers 200 in full (a server without that page, or unreachable)."""
    try:
        async with client.get(url) as resp:
            return await resp.read() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def fetch_server_metrics(client: aiohttp.ClientSession, base_url: str,
                               prefixes: tuple[str, ...]) -> dict[str, float] | None:
    """The server's `/metrics` samples under `prefixes`, or None when it has no such page."""
    body = await _get_optional(client, base_url.rstrip("/") + "/metrics")
    return None if body is None else parse_prometheus(body.decode("utf-8", "replace"), prefixes)


async def fetch_splits(client: aiohttp.ClientSession, base_url: str) -> dict[str, Any] | None:
    """The server's `GET /splits` (semipd: each engine's SM split and recent changes), or None without one."""
    raw = await _get_optional(client, base_url.rstrip("/") + "/splits")
    try:
        body = None if raw is None else json.loads(raw)
    except ValueError:  # another server's page at that path (HTML, a catch-all): no splits
        return None
    return body if isinstance(body, dict) and isinstance(body.get("data"), list) else None


__all__ = [
    "DONE", "ENDPOINTS", "OPTIONAL_FIELDS", "EndpointConfig", "RequestRecord", "ServerError", "StreamTimer",
    "build_payload", "count_tokens", "fetch_models", "fetch_server_metrics", "fetch_splits", "parse_prometheus",
    "parse_sse_line", "send_request",
]
