"""The body of OpenAI's Responses API (`POST /v1/responses`), as vLLM's server takes it, and its chat completions
equivalent.

A Responses call is a chat completion in another shape: `instructions` become a system message first, `input` (a
string, or a list of items) the messages, the flat function `tools` and `tool_choice` chat's nested ones,
`text.format` chat's `response_format`, `max_output_tokens` chat's `max_tokens`, `parallel_tool_calls` chat's own;
vLLM's extra sampling fields (`top_k`, `min_p`, `seed`, `stop`, `logit_bias`, ...) pass through with their chat names,
so that chat's schema checks them. Input items:

- messages `{role, content}` (`type` "message" or left out), the content a string or a list of `input_text` /
  `output_text` parts;
- `function_call` (an earlier call: an assistant's tool call, joined to the assistant message before it) and
  `function_call_output` (its result: a tool message);
- `reasoning` (an earlier output's, passed back): dropped, as chat templates drop earlier turns' thinking.

Unknown fields are ignored; `store` is accepted and nothing is stored (vLLM's default without
`VLLM_ENABLE_RESPONSES_API_STORE`), so `previous_response_id`, `background` and reusable `prompt` templates are refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from cluster.openai_api.errors import APIError
from cluster.openai_api.schemas import ContentPart, _Schema

# vLLM's sampling extensions a Responses body may carry, under their chat names (chat's schema checks them)
PASSED_THROUGH = ("top_k", "min_p", "seed", "stop", "stop_token_ids", "logit_bias", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "include_stop_str_in_output",
                  "skip_special_tokens", "priority", "cache_salt", "chat_template_kwargs")


class InputMessage(_Schema):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(_Schema):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Schema):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]


class ReasoningItem(_Schema):
    type: Literal["reasoning"]


INPUT_ITEMS: dict[str, type[_Schema]] = {"message": InputMessage, "function_call": FunctionCallItem,
                                         "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem}


class FunctionTool(_Schema):
    """A Responses function tool: flat, `{type, name, description, parameters, strict}`."""

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Schema):
    """A `tool_choice` that names the function to call (Responses' flat shape)."""

    type: Literal["function"]
    name: str


class TextFormat(_Schema):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Schema):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Schema):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction = "auto"
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    store: bool = True  # accepted; nothing is stored
    background: bool = False
    previous_response_id: str | None = None
    prompt: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None  # accepted, not used: the model reasons as its template has it
    truncation: Literal["auto", "disabled"] = "disabled"
    service_tier: str = "auto"
    include: list[str] | None = None
    top_logprobs: int = 0  # with `include` "message.output_text.logprobs": the most likely tokens of each

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """A field sent as null takes its default, as in OpenAI's API (clients send unset fields as null)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def check_supported(self) -> None:
        """400 for what a server that stores nothing cannot do, and for a tool choice or format that does not fit."""
        if self.previous_response_id is not None:
            raise APIError(400, f"Previous response with id '{self.previous_response_id}' not found: this server "
                                "stores no responses (`store` is accepted and ignored), so send the earlier turns "
                                "in `input` instead.", param="previous_response_id")
        if self.background:
            raise APIError(400, "this server stores no responses (`store` is accepted and ignored) and therefore "
                                "does not support the background mode.", param="background")
        if self.prompt is not None:
            raise APIError(400, "prompt template is not supported", param="prompt")
        fmt = self.format
        if fmt is not None and fmt.type == "json_schema" and (not fmt.name or not isinstance(fmt.schema_, dict)):
            raise APIError(400, "text.format json_schema needs a name and a schema (a JSON schema object)",
                           param="text.format")
        choice = self.tool_choice
        if isinstance(choice, NamedFunction) and choice.name not in {t.name for t in self.tools}:
            raise APIError(400, f"tool_choice names {choice.name!r}, which is not one of the tools", param="tool_choice")
        if (choice == "required" or isinstance(choice, NamedFunction)) and fmt is not None and fmt.type != "text":
            raise APIError(400, "a required or named tool_choice cannot be combined with a text.format other than "
                                "text", param="tool_choice")

    @property
    def output_logprobs(self) -> bool:
        """Whether the output text carries its tokens' logprobs (`include` "message.output_text.logprobs")."""
        return "message.output_text.logprobs" in (self.include or ())

    @property
    def format(self) -> TextFormat | None:
        return self.text.format if self.text is not None else None

    def chat_body(self, data: dict[str, Any]) -> dict[str, Any]:
        """The chat completions body of this request (`data`, its JSON, gives the fields passed through)."""
        body: dict[str, Any] = {k: data[k] for k in PASSED_THROUGH if data.get(k) is not None}
        body.update(model=self.model, messages=self.messages(), max_tokens=self.max_output_tokens,
                    temperature=self.temperature, top_p=self.top_p, user=self.user,
                    parallel_tool_calls=self.parallel_tool_calls)
        if self.output_logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        if self.tools and self.tool_choice != "none":  # as vLLM: tool_choice none keeps the tools from the template
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type", "strict"},
                                                                           exclude_none=True)} for t in self.tools]
        if self.tools or self.tool_choice not in ("auto", "none"):
            choice = self.tool_choice
            body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}}
                                   if isinstance(choice, NamedFunction) else choice)
        fmt = self.format
        if fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_}}
        return body

    def messages(self) -> list[dict[str, Any]]:
        """`instructions` and `input` as chat messages; 400 naming an item that is not supported."""
        out: list[dict[str, Any]] = []
        if self.instructions:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            out.append({"role": "user", "content": self.input})
            return out
        for i, raw in enumerate(self.input):
            item = _input_item(i, raw)
            if isinstance(item, InputMessage):
                out.append({"role": item.role, "content": _text(item.content, f"input.{i}.content")})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if out and out[-1]["role"] == "assistant":  # calls of one turn: one assistant message
                    out[-1].setdefault("tool_calls", []).append(call)
                else:
                    out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                out.append({"role": "tool", "tool_call_id": item.call_id,
                            "content": _text(item.output, f"input.{i}.output")})
        if not out:
            raise APIError(400, "input must not be empty", param="input")
        return out

    def echo(self) -> dict[str, Any]:
        """The request's fields a response shows, as OpenAI's (the sampling ones come from the engine request)."""
        return {"instructions": self.instructions, "metadata": self.metadata or {},
                "parallel_tool_calls": self.parallel_tool_calls, "previous_response_id": None,
                "reasoning": self.reasoning, "service_tier": self.service_tier, "store": False,
                "text": (self.text.model_dump(by_alias=True, exclude_none=True) if self.text is not None and
                         self.text.format is not None else {"format": {"type": "text"}}),
                "tool_choice": (self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedFunction)
                                else self.tool_choice), "tools": [t.model_dump() for t in self.tools],
                "truncation": self.truncation, "user": self.user, "background": False, "max_tool_calls": None}


def _input_item(i: int, raw: dict[str, Any]) -> BaseModel:
    kind = raw.get("type", "message")
    schema = INPUT_ITEMS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise APIError(400, f"input item type {kind!r} is not supported; input items are message, function_call, "
                            "function_call_output or reasoning", param=f"input.{i}.type")
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(["input", str(i), *(str(x) for x in err["loc"])])
        raise APIError(400, f"invalid request: {where}: {err['msg']}", param=where) from None


def _text(content: str | list[ContentPart], param: str) -> str:
    if isinstance(content, str):
        return content
    if any(p.type not in ("input_text", "output_text") or p.text is None for p in content):
        raise APIError(400, "only text content parts (input_text, output_text) are supported", param=param)
    return "".join(p.text or "" for p in content)
