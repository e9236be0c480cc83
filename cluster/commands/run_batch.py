"""`semipd run-batch`: a file in OpenAI's Batch API format through a model run in-process, as `vllm run-batch`.

Each input line is `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" | "/v1/completions" |
"/v1/responses", "body": {...}}`. Each output line, in the input's order (blank input lines skipped, as vLLM), is
vLLM's `BatchRequestOutput`: `{"id": "batch_req_...", "custom_id": ..., "response": {"status_code": ...,
"request_id": ..., "body": ...}, "error": ...}`. A request the API answers is `status_code` 200, its OpenAI object
in `body` and `error` null; one it refuses (a bad body: 400, an unknown model: 404, ...) has that status, `body`
null and the API's error body (`{"error": {"message", "type", "param", "code"}}`) in `error`, as vLLM puts its
ErrorResponse there. A line that cannot be sent (not JSON, a field missing, a url other than the three, a streamed
body: "Request must not be sent in stream mode") is status 400 with the reason as a string in `error`, as vLLM's
`make_error_request_output`; where vLLM fails the whole run on a line that is not a valid request, here only that
line fails. Every request goes through the OpenAI app of `semipd serve` (`cluster.openai_api.create_app` over a
`LocalEngineClient`), in-process over `httpx.ASGITransport`, so it is checked and answered exactly as the HTTP API
does; up to --max-concurrency run at once (default 2 x --max-num-seqs, vLLM's bound) so that the engine batches them.
The exit code is 0 once the file is processed, even when some lines failed (as vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cluster.commands.files import check_device
from cluster.commands.serve import add_output_parser_flags

log = logging.getLogger(__name__)

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
STREAM_ERROR = "Request must not be sent in stream mode"  # vLLM's words
_READ_CHUNK = 1024  # input lines read at a time (off the event loop)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run-batch", help="run a file of OpenAI Batch API requests through a local engine (as vllm run-batch)",
        description="Offline processing of an OpenAI Batch API file (JSON Lines of {custom_id, method, url, body}; "
                    f"url: {', '.join(SUPPORTED_URLS)}) with the model run in-process; one output line per input line, "
                    "in order.")
    p.add_argument("-i", "--input-file", required=True, metavar="PATH",
                   help="the batch file (JSON Lines), a local path ('-': stdin); URLs are not supported")
    p.add_argument("-o", "--output-file", required=True, metavar="PATH",
                   help="where the results go (JSON Lines), a local path ('-': stdout); URLs are not supported")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--served-model-name", default=None,
                   help="the name requests' `model` field may give (default: the directory's name; its path works too)")
    p.add_argument("--mode", default="unified", choices=["unified", "semi-pd"])
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length: prompt plus output tokens (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="largest decode batch")
    p.add_argument("--max-prefill-tokens", type=int, default=4096, help="token budget of one prefill iteration")
    p.add_argument("--num-pages", type=int, default=None, help="KV pages (default: from memory)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0, help="engine seed (requests may give their own `seed`)")
    p.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                   help="requests in flight at once (default: 2 x --max-num-seqs, as vLLM)")
    add_output_parser_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


# -- lines ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchRequest:
    custom_id: str
    url: str
    body: dict[str, Any]


def parse_line(line: str) -> tuple[BatchRequest | None, Any, str | None]:
    """(the request, None, None), or (None, the line's custom_id if it has one, why it cannot be sent)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, None, f"the line is not valid JSON: {e}"
    if not isinstance(obj, dict):
        return None, None, f"a batch line must be a JSON object, got {type(obj).__name__}"
    custom_id = obj.get("custom_id")
    missing = [k for k in ("custom_id", "method", "url", "body") if k not in obj]
    if missing:
        return None, custom_id, f"the line lacks {', '.join(missing)} (a batch line has custom_id, method, url, body)"
    if not isinstance(custom_id, str):
        return None, custom_id, "custom_id must be a string"
    url, body = obj["url"], obj["body"]
    if obj["method"] != "POST":
        return None, custom_id, f"method {obj['method']!r} was used; only POST is supported"
    if url not in SUPPORTED_URLS:  # vLLM's message
        return None, custom_id, f"URL {url} was used. Supported endpoints: {', '.join(SUPPORTED_URLS)}."
    if not isinstance(body, dict):
        return None, custom_id, "body must be a JSON object"
    if body.get("stream") is True:
        return None, custom_id, STREAM_ERROR
    return BatchRequest(custom_id, url, body), None, None


def output_line(custom_id: Any, status: int, request_id: str, body: Any = None, error: Any = None) -> dict[str, Any]:
    """vLLM's BatchRequestOutput, with OpenAI's `batch_req_` ids."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": error}


def new_request_id() -> str:
    return f"semipd-batch-{uuid.uuid4().hex}"


async def send(http: Any, req: BatchRequest) -> dict[str, Any]:
    """One request through the app: its output line."""
    from cluster.openai_api.errors import error_body

    rid = new_request_id()
    try:
        r = await http.post(req.url, json=req.body, headers={"x-request-id": rid})
    except Exception as e:  # the app answers its own failures (500); this is the transport's
        log.exception("batch request %s failed", req.custom_id)
        return output_line(req.custom_id, 500, rid, error=f"{type(e).__name__}: {e}")
    rid = r.headers.get("x-request-id", rid)
    if r.headers.get("content-type", "").startswith("text/event-stream"):  # `stream` given as 1, "true", ...
        return output_line(req.custom_id, 400, rid, error=STREAM_ERROR)
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code == 200 and data is not None:
        return output_line(req.custom_id, 200, rid, body=data)
    if not (isinstance(data, dict) and "error" in data):
        data = error_body(r.status_code, r.text or r.reason_phrase)
    return output_line(req.custom_id, r.status_code, rid, error=data)


# -- files ------------------------------------------------------------------------------


async def read_lines(f: IO[str]) -> AsyncIterator[str]:
    """The file's non-blank lines, stripped (a UTF-8 byte order mark too, which Windows editors write first), read
    a chunk at a time off the event loop (stdin may block)."""
    while True:
        chunk = await asyncio.to_thread(lambda: list(itertools.islice(f, _READ_CHUNK)))
        if not chunk:
            return
        for line in chunk:
            line = line.strip().removeprefix("\ufeff")
            if line:
                yield line


class OrderedWriter:
    """Writes output lines in input order as they complete, holding only those that came early."""

    def __init__(self, f: IO[str]) -> None:
        self.f = f
        self.next = 0
        self.held: dict[int, dict[str, Any]] = {}
        self.failed = 0

    def add(self, index: int, line: dict[str, Any]) -> None:
        self.held[index] = line
        while self.next in self.held:
            out = self.held.pop(self.next)
            self.failed += out["error"] is not None
            self.f.write(json.dumps(out, ensure_ascii=False) + "\n")
            self.next += 1
        self.f.flush()


def _check_paths(args: argparse.Namespace) -> None:
    """ValueError / FileNotFoundError (exit 2) for what would fail only after the engine started."""
    for flag, value, std in (("--input-file", args.input_file, "stdin"), ("--output-file", args.output_file, "stdout")):
        if "://" in value:
            raise ValueError(f"{flag}: URLs are not supported, give a local path ('-' for {std}): {value}")
    if args.input_file != "-":
        if not Path(args.input_file).exists():
            raise FileNotFoundError(f"input file not found: {args.input_file}")
        if Path(args.input_file).is_dir():
            raise ValueError(f"input file is a directory: {args.input_file}")
        if not os.access(args.input_file, os.R_OK):
            raise ValueError(f"input file is not readable: {args.input_file}")
    if args.output_file != "-":
        out = Path(args.output_file)
        if out.is_dir():
            raise ValueError(f"output file is a directory: {args.output_file}")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise FileNotFoundError(f"output file's directory not found: {parent}")
        if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise ValueError(f"output file is not writable: {args.output_file}")
        if args.input_file != "-" and out.exists() and out.samefile(args.input_file):
            raise ValueError("the output file is the input file")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    check_device(args.device)


def engine_config(args: argparse.Namespace) -> Any:
    from cluster.bootstrap import EngineOptions

    return EngineOptions(device=args.device, dtype=args.dtype, seed=args.seed, num_pages=args.num_pages,
                         max_prefill_tokens=args.max_prefill_tokens, max_decode_seqs=args.max_num_seqs,
                         max_model_len=args.max_model_len).engine_config(args.model, args.mode)


# -- the run ----------------------------------------------------------------------------


async def run_batch(app: Any, inp: IO[str], out: IO[str], concurrency: int, progress: bool = True) -> tuple[int, int]:
    """Every line of `inp` through `app`, results to `out` in order: (lines, lines that failed)."""
    import httpx
    from tqdm import tqdm

    writer = OrderedWriter(out)
    sem = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    bar = tqdm(total=None, unit="req", desc="Running batch", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def done(index: int, line: dict[str, Any]) -> None:
        writer.add(index, line)
        bar.update()

    async def one(index: int, req: BatchRequest) -> None:
        try:
            done(index, await send(http, req))
        finally:
            sem.release()

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # the app's 500 answer, not its exception
    index = 0
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://semipd", timeout=None) as http:
            async for line in read_lines(inp):
                req, custom_id, why = parse_line(line)
                if req is None:
                    done(index, output_line(custom_id, 400, new_request_id(), error=why))
                else:
                    await sem.acquire()
                    task = asyncio.create_task(one(index, req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                index += 1
            bar.total = index
            bar.refresh()
            while tasks:
                await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        bar.close()
    return index, writer.failed


def run(args: argparse.Namespace) -> int:
    _check_paths(args)
    cfg = engine_config(args)  # a ConfigError (exit 2) before anything starts
    from cluster.engine_client import LocalEngineClient
    from cluster.openai_api import create_app

    concurrency = args.max_concurrency or 2 * args.max_num_seqs
    client = LocalEngineClient(cfg, served_name=args.served_model_name)
    try:
        app = create_app(client, client.llm.tokenizer, tool_call_parser=args.tool_call_parser,
                         reasoning_parser=args.reasoning_parser)
        inp = sys.stdin if args.input_file == "-" else open(args.input_file, encoding="utf-8", errors="replace")
        try:
            out = sys.stdout if args.output_file == "-" else open(args.output_file, "w", encoding="utf-8")
            try:
                total, failed = asyncio.run(run_batch(app, inp, out, concurrency, progress=not args.no_progress))
            finally:
                if out is not sys.stdout:
                    out.close()
        finally:
            if inp is not sys.stdin:
                inp.close()
    finally:
        client.shutdown()
    where = "stdout" if args.output_file == "-" else args.output_file
    print(f"run-batch: {total} request(s), {total - failed} succeeded, {failed} failed; results in {where}",
          file=sys.stderr, flush=True)
    return 0
