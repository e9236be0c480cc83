"""OpenAI-compatible HTTP API over an `EngineClient`, with vLLM's routes, errors and metrics.

`create_app(client, tokenizer)` returns a FastAPI app with
`POST /v1/completions`, `POST /v1/chat/completions` (streaming as SSE `data: {...}`
chunks ending with `data: [DONE]`, or not), `POST /v1/responses` (OpenAI's Responses API over the same chat
handling; nothing is stored, so `GET /v1/responses/{id}` is a 404), `GET /v1/models`, `POST /tokenize`,
`POST /detokenize`, `GET /health` (503 when no engine makes progress),
`GET /metrics` (Prometheus, see `cluster.metrics`), `GET /splits` (each engine's
SM split and its recent changes: time, from, to, reason), `GET /version`, `POST /reset_prefix_cache`,
and SageMaker's `POST /invocations` (a chat or a completions body) and `/ping`.

Requests are tokenized and checked here (parameters, model name, context length)
before anything is dispatched. Errors have OpenAI's body,
`{"error": {"message", "type", "param", "code"}}`: 400 bad input (the over-long prompt
message in vLLM's words, which clients match), 401 bad API key, 404 unknown model,
413 body too large, 429 admission refused, 503 draining or no capacity. A client
that disconnects aborts its requests, which frees their KV pages.

Headers: `x-request-id` (used as the request id and echoed back), `x-slo-ttft-ms`,
`x-slo-tpot-ms` (per-request SLO targets for the router), `x-session-id`.

Modules: `schemas` (the bodies), `errors` (OpenAI's error body and the status of each failure), `render`
(a call's state and its JSON), `streams` (merged engine streams, disconnects), `tools` (tool calls read back
from the model's text, or forced by a grammar), `reasoning` (a reasoning model's thinking read back as the
message's `reasoning`), `server` (the handling), `responses_schemas` and `responses` (the Responses API: its body
as a chat body, its output items and events), `app` (`create_app`).
"""

from cluster.openai_api.app import create_app

__all__ = ["create_app"]
