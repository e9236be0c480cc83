"""Request and response bodies of the OpenAI API (OpenAI's fields plus vLLM's extensions), as pydantic models.

Unknown fields are ignored, as OpenAI's and vLLM's servers do; a body that does not validate is a 400
(`parse_body`).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer

from actors.request import SamplingParamsError, StructuredOutputsParams
from cluster.openai_api.errors import APIError

MAX_N = 128
T = TypeVar("T")


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Schema):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries its choice's token counts so far


class StructuredOutputsFields(_Schema):
    """vLLM's `structured_outputs`: exactly one of a JSON schema, a regex, choices, a grammar (Lark or GBNF) or
    any JSON object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class SamplingFields(_Schema):
    """Fields common to completions and chat (OpenAI's plus vLLM's extensions)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    priority: int = 0
    user: str | None = None
    cache_salt: str | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    structured_outputs: StructuredOutputsFields | None = None
    response_format: dict[str, Any] | None = None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """What the output must match: vLLM's `structured_outputs` or OpenAI's `response_format` (`json_object`,
        or `json_schema` with its `schema`); 400 for both at once, or for one that is malformed."""
        fmt = self.response_format_params()
        if self.structured_outputs is None:
            return fmt
        if fmt is not None:
            raise APIError(400, "give structured_outputs or a response_format other than text, not both",
                           param="structured_outputs")
        so = self.structured_outputs
        try:
            return StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                           json_object=bool(so.json_object),
                                           disable_any_whitespace=so.disable_any_whitespace)
        except SamplingParamsError as e:
            raise APIError(400, str(e), param="structured_outputs") from None

    def response_format_params(self) -> StructuredOutputsParams | None:
        fmt = self.response_format
        if fmt is None or fmt.get("type", "text") == "text":
            return None
        if fmt.get("type") == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON schema object",
                               param="response_format")
            return StructuredOutputsParams(json=schema)
        raise APIError(400, f"response_format type must be text, json_object or json_schema, got {fmt.get('type')!r}",
                       param="response_format")

    def truncated(self, ids: list[int]) -> list[int]:
        """`ids` cut to their last `truncate_prompt_tokens` (vLLM's), if set."""
        return ids[-self.truncate_prompt_tokens:] if self.truncate_prompt_tokens else ids

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")

    def check_prompt_logprobs(self) -> None:
        """400 for `prompt_logprobs` asked of a stream, as vLLM (0, the prompt tokens' own alone, is let through)."""
        if self.stream and self.prompt_logprobs is not None and (self.prompt_logprobs > 0 or
                                                                 self.prompt_logprobs == -1):
            raise APIError(400, "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")

    def logit_bias_by_id(self) -> dict[int, float]:
        """`logit_bias` (token ids as JSON object keys) keyed by int; 400 for a key that is not an integer."""
        out: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                out[int(key)] = bias
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        return out

    @property
    def include_usage(self) -> bool:
        """A stream ends with a chunk of token counts (`stream_options.include_usage`)."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Every chunk carries its choice's token counts so far (vLLM's `continuous_usage_stats`, with usage)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Schema):
    type: str
    text: str | None = None


class ChatMessage(_Schema):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: the call it answers


class ToolFunction(_Schema):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Schema):
    type: Literal["function"] = "function"
    function: ToolFunction


class ChatTemplateFields(_Schema):
    """How messages go through the chat template (vLLM's fields). The template writes its own special tokens,
    so none are added on top unless `add_special_tokens`."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def check_template_options(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise APIError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                           param="continue_final_message")


class FunctionName(_Schema):
    name: str


class NamedToolChoice(_Schema):
    """A `tool_choice` that names the function to call: `{"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: the first call only (vLLM's, OpenAI's); None: true
    include_reasoning: bool = True  # vLLM's: false drops the reasoning a reasoning parser reads

    def tool_choice_mode(self) -> str | None:
        """How the output is read for tool calls: None (not), "auto" (the parser finds calls, if any),
        "required" (one or more calls, forced by a grammar), or a function's name (that function, forced);
        400 for a choice that names no given tool, or that comes with a format of its own."""
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if self.tools else "none")
        if choice == "none":
            return None
        if not self.tools:
            raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        if choice == "auto":
            return "auto"
        if self.structured_outputs is not None or self.response_format_params() is not None:
            raise APIError(400, "a required or named tool_choice cannot be combined with structured_outputs or "
                                "response_format", param="tool_choice")
        if choice == "required":
            return "required"
        assert isinstance(choice, NamedToolChoice)
        if choice.function.name not in {t.function.name for t in self.tools}:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not one of the tools",
                           param="tool_choice")
        return choice.function.name


class TokenizeRequest(ChatTemplateFields):
    """A `prompt` (special tokens added unless `add_special_tokens` is false) or `messages` (through the chat
    template, none added unless it is true), as vLLM's `/tokenize`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # type: ignore[assignment]


class DetokenizeRequest(_Schema):
    model: str | None = None
    tokens: list[int]


class PromptTokensDetails(_Schema):
    cached_tokens: int  # prompt tokens served by the prefix cache


class Usage(_Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(_Schema):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(_Schema):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(_Schema):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    reasoning: str | None = None  # vLLM's field, there (null or not) when the server reads reasoning, else left out

    @model_serializer(mode="wrap")
    def _reasoning_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if "reasoning" not in self.model_fields_set:
            out.pop("reasoning", None)
        return out


class ChatChoice(_Schema):
    index: int
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it


class ChatCompletionResponse(_Schema):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, Any] | None] | None = None


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors()
    parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in errors[:5]]
    param = ".".join(str(x) for x in errors[0]["loc"]) if errors and errors[0]["loc"] else None
    return APIError(400, "invalid request: " + "; ".join(parts), param=param)


def parse_body(schema: type[T], data: Any) -> T:
    """`data` (parsed JSON) as `schema`; APIError 400 naming the first fields at fault."""
    try:
        return schema.model_validate(data)  # type: ignore[attr-defined, no-any-return]
    except ValidationError as e:
        raise _validation_error(e) from None
