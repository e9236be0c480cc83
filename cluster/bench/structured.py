"""Structured outputs for `semipd bench serve` (vLLM's benchmark_serving_structured_output): what every request
asks its output to match, and whether a finished output does.

`StructuredOutput(kind, spec)` is one of `json` (a JSON schema; built-in: a small object with an enum, a boolean,
a bounded integer and a short string), `json-object` (any JSON object), `regex` (built-in `[a-z]{3,8}-[0-9]{2,4}`)
or `choice` (built-in: four words). `body()` is the request's `structured_outputs` field; `conforms(text, finish)`
checks a finished output: json with jsonschema; regex with Python's `re.fullmatch` (the server's regex dialect
may differ for exotic patterns); choice by equality. Only an output that ended with finish reason "stop" can
conform: one cut at max_tokens ("length") never does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from cluster.commands.files import text_or_file

KINDS: tuple[str, ...] = ("json", "json-object", "regex", "choice")

BUILTIN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ok", "degraded", "down"]},
        "urgent": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["status", "urgent", "count", "note"],
    "additionalProperties": False,
}
BUILTIN_REGEX = "[a-z]{3,8}-[0-9]{2,4}"
BUILTIN_CHOICES: tuple[str, ...] = ("positive", "negative", "neutral", "mixed")



class StructuredOutputError(ValueError):
    """An invalid structured-output setting (CLI exit 2)."""


@dataclass(frozen=True)
class StructuredOutput:
    """What every request's output must match (validated on construction).

    `spec`: the schema (json), pattern (regex) or choices (choice); None takes the built-in one, and json-object
    has none. `no_whitespace`: send "disable_any_whitespace": true (JSON without whitespace between tokens).
    """

    kind: str
    spec: Any = None
    no_whitespace: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredOutputError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.spec is None:
            object.__setattr__(self, "spec", _builtin(self.kind))
        if self.kind == "json-object":
            if self.spec is not None:
                raise StructuredOutputError("json-object takes no spec")
        elif self.kind == "json":
            if not isinstance(self.spec, dict):
                raise StructuredOutputError(
                    f"a json spec must be a JSON object (a schema), got {type(self.spec).__name__}")
            try:
                jsonschema.validators.validator_for(self.spec).check_schema(self.spec)
            except jsonschema.SchemaError as e:
                raise StructuredOutputError(f"the json spec is not a valid JSON schema: {e.message}") from None
        elif self.kind == "regex":
            if not isinstance(self.spec, str) or not self.spec:
                raise StructuredOutputError("a regex spec must be a non-empty pattern")
            try:
                re.compile(self.spec)
            except re.error as e:
                raise StructuredOutputError(f"regex {self.spec!r} does not compile in Python: {e}") from None
        else:
            if isinstance(self.spec, list):
                object.__setattr__(self, "spec", tuple(self.spec))
            if not (isinstance(self.spec, tuple) and self.spec and all(isinstance(c, str) for c in self.spec)):
                raise StructuredOutputError(f"a choice spec must be a non-empty list of strings, got {self.spec!r}")

    def body(self) -> dict[str, Any]:
        """The request's `structured_outputs` field (vLLM's)."""
        field: dict[str, Any]
        if self.kind == "json":
            field = {"json": self.spec}
        elif self.kind == "json-object":
            field = {"json_object": True}
        elif self.kind == "regex":
            field = {"regex": self.spec}
        else:
            field = {"choice": list(self.spec)}
        if self.no_whitespace:
            field["disable_any_whitespace"] = True
        return field

    def matches(self, text: str) -> bool:
        """Whether `text` is what was asked for (whatever the finish reason)."""
        if self.kind == "regex":
            return re.fullmatch(self.spec, text) is not None
        if self.kind == "choice":
            return text in self.spec
        try:
            value = json.loads(text, parse_constant=_not_json)
        except ValueError:
            return False
        if self.kind == "json-object":
            return isinstance(value, dict)
        return jsonschema.validators.validator_for(self.spec)(self.spec).is_valid(value)

    def conforms(self, text: str, finish_reason: str | None) -> bool:
        """Whether a finished output conforms: it ended with "stop" and matches."""
        return finish_reason == "stop" and self.matches(text)

    def to_dict(self) -> dict[str, Any]:
        """The kind, the spec and the whitespace flag."""
        return {"kind": self.kind, "spec": list(self.spec) if isinstance(self.spec, tuple) else self.spec,
                "disable_any_whitespace": self.no_whitespace}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredOutput:
        return cls(data["kind"], data.get("spec"), bool(data.get("disable_any_whitespace", False)))


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _builtin(kind: str) -> Any:
    return {"json": BUILTIN_SCHEMA, "regex": BUILTIN_REGEX, "choice": BUILTIN_CHOICES}.get(kind)


def parse_spec(kind: str, text: str) -> Any:
    """`--structured-spec`: a file's contents or the text itself; JSON for json (a schema) and choice (a list),
    a pattern for regex (a file's trailing newline dropped)."""
    if kind not in ("json", "regex", "choice"):
        raise StructuredOutputError(f"--structured-spec applies to json, regex and choice, not {kind}")
    source, is_file = text_or_file(text)
    if kind == "regex":
        return source.rstrip("\r\n") if is_file else source
    try:
        spec = json.loads(source)
    except json.JSONDecodeError as e:
        where = f"file {text}" if is_file else "text"
        raise StructuredOutputError(f"--structured-spec {where} is not valid JSON: {e}") from None
    if kind == "choice" and not isinstance(spec, list):
        raise StructuredOutputError(f"--structured-spec for choice must be a JSON list, got {type(spec).__name__}")
    return spec
