"""A small renderer for the subset of Helm's Go templates that deploy/helm/semipd uses.

The `helm` binary cannot be installed where the tests run, so the chart is rendered here
with a tokenizer and a small recursive evaluator written against the documented
semantics of Go's text/template and of Helm/Sprig's functions. The subset:

- actions `{{ pipeline }}`, whitespace trimming `{{- ` / ` -}}`, comments `{{/* */}}`;
- `if` / `else if` / `else` / `end`, `with` / `else` / `end`, `range` (lists, maps in
  sorted key order, `$v :=` and `$k, $v :=` forms) / `else` / `end`, `define` / `end`;
- operands: `.`, `.A.b` chains, `$`, `$name`, `$name.a.b`, `( pipeline )`, string, raw
  string, number, `true` / `false` / `nil` literals; variable declaration `$x :=`;
- pipelines `a | b arg` (the piped value is the last argument);
- functions: default, quote, toYaml, toJson, nindent, indent, b64enc, required,
  include, hasKey, eq, ne, and, or, not.

Anything else (an unknown function, `template`, `block`, `break`, a char constant...)
raises TemplateError when the template is *parsed*, so a branch that the tests never
take cannot hide an unsupported construct either.

Where Helm is lenient in ways that hide bugs, this renderer is stricter and says so:
printing a map or list (Helm prints Go's `map[...]` syntax) is an error, and with
`strict=True` (like `helm lint --strict`) a missing key under `.Values` is an error.
Values are handled as Helm does: numbers read from values files are float64, so an
integer prints as `1` but 1000000 prints as `1e+06`; `toYaml` / `toJson` print integral
floats as integers; `eq` between a values number and an integer literal is an error.
"""

from __future__ import annotations

import ast
import base64
import copy
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Chart", "TemplateError", "load_chart", "merge_values", "parse_template", "render_chart", "render_text"]

SPACE = " \t\r\n"
MAX_INCLUDE_DEPTH = 100


class TemplateError(Exception):
    """A template that cannot be parsed or executed: unknown function or action, bad
    syntax, a missing value in strict mode, an argument of the wrong type."""


# --------------------------------------------------------------------------- lexing


@dataclass(frozen=True)
class TextItem:
    text: str


@dataclass(frozen=True)
class ActionItem:
    body: str
    trim_left: bool
    trim_right: bool
    is_comment: bool
    where: str  # "file:line" for error messages


def _line_of(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


def _find_action_end(src: str, pos: int, where: str) -> tuple[int, int, bool]:
    """From `pos` (just inside `{{`), return (body_end, after_delim, trim_right)."""
    quote: str | None = None
    i = pos
    while i < len(src):
        c = src[i]
        if quote is not None:
            if c == "\\" and quote != "`":
                i += 2
                continue
            if c == quote:
                quote = None
            elif c == "\n" and quote != "`":
                raise TemplateError(f"{where}: unterminated quoted string")
            i += 1
            continue
        if c in "\"`'":
            quote = c
        elif c in SPACE and src.startswith("-}}", i + 1):
            return i, i + 4, True
        elif src.startswith("}}", i):
            return i, i + 2, False
        i += 1
    raise TemplateError(f"{where}: unclosed action")


def split_template(src: str, name: str) -> list[TextItem | ActionItem]:
    """Split template source into text and actions, with `{{-`/`-}}` trimming applied."""
    items: list[TextItem | ActionItem] = []
    pos = 0
    while True:
        start = src.find("{{", pos)
        if start < 0:
            items.append(TextItem(src[pos:]))
            break
        items.append(TextItem(src[pos:start]))
        where = f"{name}:{_line_of(src, start)}"
        i = start + 2
        trim_left = src.startswith("-", i) and i + 1 < len(src) and src[i + 1] in SPACE
        if trim_left:
            i += 2
        if src.startswith("/*", i):
            close = src.find("*/", i + 2)
            if close < 0:
                raise TemplateError(f"{where}: unclosed comment")
            after = close + 2
            trim_right = src.startswith(" -}}", after)
            if not (trim_right or src.startswith("}}", after)):
                raise TemplateError(f"{where}: comment ends before closing delimiter")
            items.append(ActionItem("", trim_left, trim_right, True, where))
            pos = after + (4 if trim_right else 2)
            continue
        body_end, pos, trim_right = _find_action_end(src, i, where)
        items.append(ActionItem(src[i:body_end], trim_left, trim_right, False, where))
    for k, item in enumerate(items):
        if isinstance(item, ActionItem):
            before, after = items[k - 1], items[k + 1]
            if item.trim_left and isinstance(before, TextItem):
                items[k - 1] = TextItem(before.text.rstrip(SPACE))
            if item.trim_right and isinstance(after, TextItem):
                items[k + 1] = TextItem(after.text.lstrip(SPACE))
    return items


_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<char>'(?:[^'\\]|\\.)*')
  | (?P<declare>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
  | (?P<number>[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    spaced: bool  # whitespace came right before it


def tokenize(body: str, where: str) -> list[Token]:
    """Tokens of one action body; whitespace is dropped but remembered on the next token."""
    tokens: list[Token] = []
    pos, spaced = 0, True
    while pos < len(body):
        m = _TOKEN_RE.match(body, pos)
        if m is None:
            raise TemplateError(f"{where}: unexpected {body[pos]!r} in action {{{{{body}}}}}")
        kind = m.lastgroup or ""
        if kind == "ws":
            spaced = True
        elif kind == "char":
            raise TemplateError(f"{where}: char constants are not supported: {m.group()}")
        else:
            tokens.append(Token(kind, m.group(), spaced))
            spaced = False
        pos = m.end()
    return tokens


# --------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Literal:
    value: Any


@dataclass(frozen=True)
class FieldRef:
    chain: tuple[str, ...]  # () is `.` itself


@dataclass(frozen=True)
class VarRef:
    name: str  # "$" or "$name"
    chain: tuple[str, ...]


@dataclass(frozen=True)
class FuncRef:
    name: str


@dataclass(frozen=True)
class SubPipeline:
    pipeline: Pipeline
    chain: tuple[str, ...]


Operand = Literal | FieldRef | VarRef | FuncRef | SubPipeline


@dataclass(frozen=True)
class Pipeline:
    decl: tuple[str, ...]
    is_assign: bool
    commands: tuple[tuple[Operand, ...], ...]
    where: str


@dataclass(frozen=True)
class TextNode:
    text: str


@dataclass(frozen=True)
class OutputNode:
    pipeline: Pipeline


@dataclass(frozen=True)
class IfNode:
    cond: Pipeline
    then: tuple[Node, ...]
    otherwise: tuple[Node, ...]


@dataclass(frozen=True)
class WithNode:
    value: Pipeline
    body: tuple[Node, ...]
    otherwise: tuple[Node, ...]


@dataclass(frozen=True)
class RangeNode:
    over: Pipeline
    body: tuple[Node, ...]
    otherwise: tuple[Node, ...]


Node = TextNode | OutputNode | IfNode | WithNode | RangeNode

KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}
UNSUPPORTED_ACTIONS = {"template", "block", "break", "continue"}
LITERAL_IDENTS = {"true": True, "false": False, "nil": None}


def _decode_string(tok: Token, where: str) -> str:
    if tok.kind == "raw":
        return tok.text[1:-1]
    try:
        value = ast.literal_eval(tok.text)
    except (SyntaxError, ValueError) as exc:
        raise TemplateError(f"{where}: bad string literal {tok.text}") from exc
    assert isinstance(value, str)
    return value


def _parse_number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


class _PipelineParser:
    """Recursive descent over the tokens of one action (after any keyword)."""

    def __init__(self, tokens: list[Token], where: str, functions: set[str], includes: set[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.where = where
        self.functions = functions
        self.includes = includes

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise TemplateError(f"{self.where}: unexpected end of action")
        self.pos += 1
        return tok

    def parse(self, allow_two_vars: bool = False) -> Pipeline:
        decl, is_assign = self._declaration(allow_two_vars)
        pipeline = self._pipeline(decl, is_assign)
        if self.peek() is not None:
            raise TemplateError(f"{self.where}: unexpected {self.peek().text!r}")  # type: ignore[union-attr]
        return pipeline

    def _declaration(self, allow_two_vars: bool) -> tuple[tuple[str, ...], bool]:
        kinds = [t.kind for t in self.tokens[:4]]
        if allow_two_vars and kinds[:4] == ["var", "comma", "var", "declare"]:
            names = (self.tokens[0].text, self.tokens[2].text)
            self.pos = 4
            return names, False
        if kinds[:2] in (["var", "declare"], ["var", "assign"]):
            self.pos = 2
            return (self.tokens[0].text,), kinds[1] == "assign"
        return (), False

    def _pipeline(self, decl: tuple[str, ...], is_assign: bool) -> Pipeline:
        commands: list[tuple[Operand, ...]] = []
        while True:
            command = self._command()
            if not isinstance(command[0], FuncRef) and (len(command) > 1 or commands):
                raise TemplateError(f"{self.where}: can't give argument to non-function {command[0]}")
            commands.append(command)
            tok = self.peek()
            if tok is None or tok.kind == "rparen":
                break
            if tok.kind != "pipe":
                raise TemplateError(f"{self.where}: unexpected {tok.text!r}")
            self.take()
        if not commands:
            raise TemplateError(f"{self.where}: missing value")
        return Pipeline(decl, is_assign, tuple(commands), self.where)

    def _command(self) -> tuple[Operand, ...]:
        operands: list[Operand] = []
        while (tok := self.peek()) is not None and tok.kind not in ("pipe", "rparen"):
            operands.append(self._operand())
        if not operands:
            raise TemplateError(f"{self.where}: empty command")
        return tuple(operands)

    def _chain(self) -> tuple[str, ...]:
        tok = self.peek()
        if tok is not None and tok.kind == "field" and not tok.spaced and tok.text != ".":
            self.take()
            return tuple(tok.text.split(".")[1:])
        return ()

    def _operand(self) -> Operand:
        tok = self.take()
        if tok.kind in ("str", "raw"):
            return Literal(_decode_string(tok, self.where))
        if tok.kind == "number":
            return Literal(_parse_number(tok.text))
        if tok.kind == "field":
            return FieldRef(() if tok.text == "." else tuple(tok.text.split(".")[1:]))
        if tok.kind == "var":
            return VarRef(tok.text, self._chain())
        if tok.kind == "lparen":
            inner = self._pipeline((), False)
            if self.take().kind != "rparen":
                raise TemplateError(f"{self.where}: unclosed parenthesis")
            return SubPipeline(inner, self._chain())
        if tok.kind == "ident":
            if tok.text in LITERAL_IDENTS:
                return Literal(LITERAL_IDENTS[tok.text])
            if tok.text in KEYWORDS:
                raise TemplateError(f"{self.where}: unexpected keyword {tok.text!r}")
            if tok.text not in self.functions:
                raise TemplateError(f"{self.where}: function {tok.text!r} not defined (unsupported by this renderer)")
            if tok.text == "include":
                nxt = self.peek()
                if nxt is not None and nxt.kind in ("str", "raw"):
                    self.includes.add(_decode_string(nxt, self.where))
            if self._chain():
                raise TemplateError(f"{self.where}: field access on a function name is not supported")
            return FuncRef(tok.text)
        raise TemplateError(f"{self.where}: unexpected {tok.text!r}")


@dataclass
class ParsedFile:
    nodes: tuple[Node, ...]
    defines: dict[str, tuple[Node, ...]]
    includes: set[str]


class _TreeParser:
    """Builds the node tree of one file from its text/action items."""

    def __init__(self, items: list[TextItem | ActionItem], functions: set[str]) -> None:
        self.items = [it for it in items if not (isinstance(it, ActionItem) and it.is_comment)]
        self.pos = 0
        self.functions = functions
        self.defines: dict[str, tuple[Node, ...]] = {}
        self.includes: set[str] = set()

    def parse_file(self) -> ParsedFile:
        nodes, stop = self._list(top_level=True)
        if stop is not None:
            raise TemplateError(f"{stop[1].where}: unexpected {{{{{stop[0]}}}}}")
        return ParsedFile(nodes, self.defines, self.includes)

    def _pipeline(self, tokens: list[Token], where: str, allow_two_vars: bool = False) -> Pipeline:
        return _PipelineParser(tokens, where, self.functions, self.includes).parse(allow_two_vars)

    def _list(self, top_level: bool = False) -> tuple[tuple[Node, ...], tuple[str, ActionItem, list[Token]] | None]:
        """Nodes up to an `else`/`end` action, returned as (keyword, item, rest tokens)."""
        nodes: list[Node] = []
        while self.pos < len(self.items):
            item = self.items[self.pos]
            self.pos += 1
            if isinstance(item, TextItem):
                if item.text:
                    nodes.append(TextNode(item.text))
                continue
            tokens = tokenize(item.body, item.where)
            if not tokens:
                raise TemplateError(f"{item.where}: missing value for command")
            head = tokens[0]
            keyword = head.text if head.kind == "ident" and head.text in KEYWORDS else None
            if keyword in ("else", "end"):
                return tuple(nodes), (keyword, item, tokens[1:])
            if keyword in UNSUPPORTED_ACTIONS:
                raise TemplateError(f"{item.where}: action {keyword!r} is not supported by this renderer")
            if keyword == "define":
                self._define(item, tokens[1:], top_level)
            elif keyword == "if":
                nodes.append(self._if(item, tokens[1:]))
            elif keyword == "with":
                value = self._pipeline(tokens[1:], item.where)
                body, otherwise = self._body_else_end(item, "with")
                nodes.append(WithNode(value, body, otherwise))
            elif keyword == "range":
                over = self._pipeline(tokens[1:], item.where, allow_two_vars=True)
                body, otherwise = self._body_else_end(item, "range")
                nodes.append(RangeNode(over, body, otherwise))
            else:
                nodes.append(OutputNode(self._pipeline(tokens, item.where)))
        if not top_level:
            raise TemplateError("unexpected end of template: missing {{end}}")
        return tuple(nodes), None

    def _expect_end(self, opener: ActionItem, stop: tuple[str, ActionItem, list[Token]] | None) -> None:
        if stop is None or stop[0] != "end" or stop[2]:
            raise TemplateError(f"{opener.where}: missing or malformed {{{{end}}}}")

    def _body_else_end(self, opener: ActionItem, what: str) -> tuple[tuple[Node, ...], tuple[Node, ...]]:
        body, stop = self._list()
        otherwise: tuple[Node, ...] = ()
        if stop is not None and stop[0] == "else":
            if stop[2]:
                raise TemplateError(f"{stop[1].where}: 'else {stop[2][0].text}' is not supported in {what}")
            otherwise, stop = self._list()
        self._expect_end(opener, stop)
        return body, otherwise

    def _if(self, opener: ActionItem, cond_tokens: list[Token]) -> IfNode:
        cond = self._pipeline(cond_tokens, opener.where)
        then, stop = self._list()
        if stop is not None and stop[0] == "else":
            rest = stop[2]
            if rest and rest[0].kind == "ident" and rest[0].text == "if":
                # `else if c` is `else` + `if c` sharing one `end`.
                return IfNode(cond, then, (self._if(stop[1], rest[1:]),))
            if rest:
                raise TemplateError(f"{stop[1].where}: 'else {rest[0].text}' is not supported")
            otherwise, stop = self._list()
            self._expect_end(opener, stop)
            return IfNode(cond, then, otherwise)
        self._expect_end(opener, stop)
        return IfNode(cond, then, ())

    def _define(self, item: ActionItem, tokens: list[Token], top_level: bool) -> None:
        if not top_level:
            raise TemplateError(f"{item.where}: define must be at the top level")
        if len(tokens) != 1 or tokens[0].kind not in ("str", "raw"):
            raise TemplateError(f"{item.where}: define needs one string name")
        name = _decode_string(tokens[0], item.where)
        body, stop = self._list()
        self._expect_end(item, stop)
        if name in self.defines:
            raise TemplateError(f"{item.where}: template {name!r} defined twice")
        self.defines[name] = body


# --------------------------------------------------------------------------- Go values


class BuiltinObject(dict):  # type: ignore[type-arg]
    """`.Release`, `.Chart`, `.Template`: Go structs, so an unknown field is always an error."""


def go_kind(value: Any) -> str:
    """Go's basic kind of a value, as text/template's eq sees it."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "other"


def go_truth(value: Any) -> bool:
    """text/template's truth: false, 0, nil and empty strings/lists/maps are false."""
    if value is None:
        return False
    if isinstance(value, (bool, int, float)):
        return value != 0
    if isinstance(value, (str, list, dict)):
        return len(value) > 0
    return True


def go_format_float(value: float) -> str:
    """Go's `%v` of a float64: shortest digits, `%e` form when the exponent is < -4 or >= 6."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign, digit_tuple, exp = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + int(exp)  # position of the decimal point in `digits`
    exponent = point - 1
    prefix = "-" if value < 0 else ""
    if exponent < -4 or exponent >= 6:
        frac = digits[1:]
        return f"{prefix}{digits[0]}{'.' + frac if frac else ''}e{'+' if exponent >= 0 else '-'}{abs(exponent):02d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{digits}"
    whole, frac = digits[:point].ljust(point, "0"), digits[point:]
    return f"{prefix}{whole}{'.' + frac if frac else ''}"


def go_string(value: Any, where: str) -> str:
    """fmt.Sprint of a scalar, as Helm prints it (nil prints as nothing)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_format_float(value)
    if isinstance(value, str):
        return value
    raise TemplateError(f"{where}: refusing to print a {type(value).__name__} (Go would print map[...]/[...]); use toYaml or toJson")


def go_quote(text: str) -> str:
    """strconv.Quote: double quotes, escapes for quotes, backslashes and non-printables."""
    named = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v", '"': '\\"', "\\": "\\\\"}
    out = []
    for ch in text:
        if ch in named:
            out.append(named[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _json_ready(value: Any, where: str) -> Any:
    """What Go's json.Marshal sees: integral float64 values print as integers."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v, where) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TemplateError(f"{where}: json: unsupported value {value}")
        if value.is_integer() and abs(value) < 1e21:
            return int(value)
    return value


def go_values(value: Any) -> Any:
    """Values as Helm holds them after reading YAML through JSON: every number is a float64."""
    if isinstance(value, dict):
        return {k: go_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [go_values(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# --------------------------------------------------------------------------- functions


def _want_str(name: str, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TemplateError(f"{where}: {name}: wrong type for value; expected string; got {go_kind(value)}")
    return value


def _want_int(name: str, value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TemplateError(f"{where}: {name}: wrong type for value; expected int; got {go_kind(value)}")
    return value


def fn_default(where: str, default: Any, *given: Any) -> Any:
    return given[0] if given and go_truth(given[0]) else default


def fn_quote(where: str, *values: Any) -> str:
    return " ".join(go_quote(go_string(v, where)) for v in values if v is not None)


def fn_to_yaml(where: str, value: Any) -> str:
    text = yaml.safe_dump(_json_ready(value, where), default_flow_style=False, sort_keys=True, allow_unicode=True, width=1 << 30)
    if text.endswith("\n...\n"):
        text = text[: -len("...\n")]
    return text[:-1] if text.endswith("\n") else text


def fn_to_json(where: str, value: Any) -> str:
    text = json.dumps(_json_ready(value, where), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def fn_indent(where: str, spaces: Any, text: Any) -> str:
    pad = " " * _want_int("indent", spaces, where)
    return pad + _want_str("indent", text, where).replace("\n", "\n" + pad)


def fn_nindent(where: str, spaces: Any, text: Any) -> str:
    return "\n" + fn_indent(where, spaces, text)


def fn_b64enc(where: str, text: Any) -> str:
    return base64.b64encode(_want_str("b64enc", text, where).encode()).decode()


def fn_required(where: str, message: Any, value: Any) -> Any:
    if value is None or value == "":
        raise TemplateError(f"{where}: required: {_want_str('required', message, where)}")
    return value


def _eq_one(a: Any, b: Any, where: str) -> bool:
    ka, kb = go_kind(a), go_kind(b)
    if ka != kb:
        if ka != "nil" and kb != "nil":
            raise TemplateError(f"{where}: incompatible types for comparison: {ka} and {kb}")
        return False
    if ka == "other":
        raise TemplateError(f"{where}: non-comparable type {type(a).__name__}")
    return bool(a == b)


def fn_eq(where: str, first: Any, *others: Any) -> bool:
    if not others:
        raise TemplateError(f"{where}: missing argument for comparison")
    return any(_eq_one(first, other, where) for other in others)


def fn_ne(where: str, a: Any, b: Any) -> bool:
    return not _eq_one(a, b, where)


def fn_not(where: str, value: Any) -> bool:
    return not go_truth(value)


def fn_has_key(where: str, mapping: Any, key: Any) -> bool:
    """Sprig's hasKey: whether a values map holds `key` (a nil map holds none); any other value is an error."""
    if mapping is not None and (not isinstance(mapping, dict) or isinstance(mapping, BuiltinObject)):
        raise TemplateError(f"{where}: hasKey: wrong type for value; expected map[string]interface {{}}; got {go_kind(mapping)}")
    return mapping is not None and _want_str("hasKey", key, where) in mapping


# name -> (implementation, minimum number of args, maximum or None)
FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int | None]] = {
    "default": (fn_default, 1, 2),
    "quote": (fn_quote, 0, None),
    "toYaml": (fn_to_yaml, 1, 1),
    "toJson": (fn_to_json, 1, 1),
    "indent": (fn_indent, 2, 2),
    "nindent": (fn_nindent, 2, 2),
    "b64enc": (fn_b64enc, 1, 1),
    "required": (fn_required, 2, 2),
    "eq": (fn_eq, 2, None),
    "ne": (fn_ne, 2, 2),
    "not": (fn_not, 1, 1),
    "hasKey": (fn_has_key, 2, 2),
}
LAZY_FUNCTIONS = {"and", "or"}  # evaluate their arguments left to right, stop early
FUNCTION_NAMES = set(FUNCTIONS) | LAZY_FUNCTIONS | {"include"}


# --------------------------------------------------------------------------- execution


@dataclass
class _Scope:
    frames: list[dict[str, Any]] = field(default_factory=list)

    def push(self) -> None:
        self.frames.append({})

    def pop(self) -> None:
        self.frames.pop()

    def declare(self, name: str, value: Any) -> None:
        self.frames[-1][name] = value

    def assign(self, name: str, value: Any, where: str) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise TemplateError(f"{where}: undefined variable {name}")

    def lookup(self, name: str, where: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise TemplateError(f"{where}: undefined variable {name}")


class _Executor:
    def __init__(self, defines: dict[str, tuple[Node, ...]], strict: bool) -> None:
        self.defines = defines
        self.strict = strict
        self.depth = 0

    def run(self, nodes: tuple[Node, ...], dot: Any) -> str:
        scope = _Scope()
        scope.push()
        scope.declare("$", dot)
        out: list[str] = []
        self._nodes(nodes, dot, scope, out)
        return "".join(out)

    def _nodes(self, nodes: tuple[Node, ...], dot: Any, scope: _Scope, out: list[str]) -> None:
        for node in nodes:
            if isinstance(node, TextNode):
                out.append(node.text)
            elif isinstance(node, OutputNode):
                value = self._pipeline(node.pipeline, dot, scope)
                if not node.pipeline.decl:
                    out.append(go_string(value, node.pipeline.where))
            elif isinstance(node, IfNode):
                branch = node.then if go_truth(self._pipeline(node.cond, dot, scope)) else node.otherwise
                self._scoped(branch, dot, scope, out)
            elif isinstance(node, WithNode):
                value = self._pipeline(node.value, dot, scope)
                if go_truth(value):
                    self._scoped(node.body, value, scope, out)
                else:
                    self._scoped(node.otherwise, dot, scope, out)
            else:
                self._range(node, dot, scope, out)

    def _scoped(self, nodes: tuple[Node, ...], dot: Any, scope: _Scope, out: list[str]) -> None:
        scope.push()
        try:
            self._nodes(nodes, dot, scope, out)
        finally:
            scope.pop()

    def _range(self, node: RangeNode, dot: Any, scope: _Scope, out: list[str]) -> None:
        decl = node.over.decl
        over = self._pipeline(Pipeline((), False, node.over.commands, node.over.where), dot, scope)
        pairs: Iterator[tuple[Any, Any]]
        if isinstance(over, dict):
            pairs = ((k, over[k]) for k in sorted(over))
        elif isinstance(over, list):
            pairs = iter(enumerate(over))
        elif over is None:
            pairs = iter(())
        else:
            raise TemplateError(f"{node.over.where}: range can't iterate over {go_kind(over)}")
        empty = True
        for key, value in pairs:
            empty = False
            scope.push()
            try:
                if len(decl) == 1:
                    scope.declare(decl[0], value)
                elif len(decl) == 2:
                    scope.declare(decl[0], key)
                    scope.declare(decl[1], value)
                self._nodes(node.body, value, scope, out)
            finally:
                scope.pop()
        if empty:
            self._scoped(node.otherwise, dot, scope, out)

    def _pipeline(self, pipeline: Pipeline, dot: Any, scope: _Scope) -> Any:
        value: Any = None
        for index, command in enumerate(pipeline.commands):
            piped = (value,) if index > 0 else ()
            value = self._command(command, piped, dot, scope, pipeline.where)
        for name in pipeline.decl:
            if pipeline.is_assign:
                scope.assign(name, value, pipeline.where)
            else:
                scope.declare(name, value)
        return value

    def _command(self, command: tuple[Operand, ...], piped: tuple[Any, ...], dot: Any, scope: _Scope, where: str) -> Any:
        head = command[0]
        if not isinstance(head, FuncRef):
            return self._operand(head, dot, scope, where)
        args = command[1:]
        name = head.name
        count = len(args) + len(piped)
        if name in LAZY_FUNCTIONS:
            if count < 1:
                raise TemplateError(f"{where}: {name}: wrong number of args")
            return self._and_or(name, args, piped, dot, scope, where)
        values = [self._operand(a, dot, scope, where) for a in args] + list(piped)
        if name == "include":
            if count != 2:
                raise TemplateError(f"{where}: include: wrong number of args: want 2 got {count}")
            return self._include(_want_str("include", values[0], where), values[1], where)
        fn, least, most = FUNCTIONS[name]
        if count < least or (most is not None and count > most):
            raise TemplateError(f"{where}: {name}: wrong number of args: got {count}")
        return fn(where, *values)

    def _and_or(self, name: str, args: tuple[Operand, ...], piped: tuple[Any, ...], dot: Any, scope: _Scope, where: str) -> Any:
        thunks: list[Callable[[], Any]] = [lambda a=a: self._operand(a, dot, scope, where) for a in args]  # type: ignore[misc]
        thunks += [lambda v=v: v for v in piped]  # type: ignore[misc]
        value: Any = None
        for thunk in thunks:
            value = thunk()
            if go_truth(value) != (name == "and"):
                return value
        return value

    def _include(self, name: str, data: Any, where: str) -> str:
        if name not in self.defines:
            raise TemplateError(f"{where}: include: no template {name!r}")
        if self.depth >= MAX_INCLUDE_DEPTH:
            raise TemplateError(f"{where}: include: too deep (recursion?) in {name!r}")
        self.depth += 1
        try:
            return self.run(self.defines[name], data)
        finally:
            self.depth -= 1

    def _operand(self, operand: Operand, dot: Any, scope: _Scope, where: str) -> Any:
        if isinstance(operand, Literal):
            return operand.value
        if isinstance(operand, FieldRef):
            return self._walk(dot, operand.chain, where)
        if isinstance(operand, VarRef):
            return self._walk(scope.lookup(operand.name, where), operand.chain, where)
        if isinstance(operand, SubPipeline):
            return self._walk(self._pipeline(operand.pipeline, dot, scope), operand.chain, where)
        if isinstance(operand, FuncRef):
            # A bare function name as an argument: Go calls it with no arguments.
            return self._command((operand,), (), dot, scope, where)
        raise TemplateError(f"{where}: bad operand {operand!r}")

    def _walk(self, value: Any, chain: tuple[str, ...], where: str) -> Any:
        path = ""
        for key in chain:
            path += "." + key
            if value is None:
                raise TemplateError(f"{where}: nil pointer evaluating interface {{}}{path}")
            if not isinstance(value, dict):
                raise TemplateError(f"{where}: can't evaluate field {key} in type {go_kind(value)}")
            if key in value:
                value = value[key]
            elif isinstance(value, BuiltinObject) or self.strict:
                raise TemplateError(f"{where}: map has no entry for key {key!r} (at {path})")
            else:
                value = None
        return value


# --------------------------------------------------------------------------- charts


@dataclass(frozen=True)
class Chart:
    """A chart directory, parsed: metadata, default values, templates and named templates."""

    directory: Path
    metadata: dict[str, Any]
    values: dict[str, Any]
    files: dict[str, ParsedFile]  # path relative to the chart dir -> parsed template
    defines: dict[str, tuple[Node, ...]]


def parse_template(src: str, name: str) -> ParsedFile:
    """Parse one template file; raises TemplateError on anything outside the subset."""
    return _TreeParser(split_template(src, name), FUNCTION_NAMES).parse_file()


def load_chart(chart_dir: Path) -> Chart:
    """Read Chart.yaml, values.yaml and parse every file under templates/."""
    metadata = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    values = yaml.safe_load((chart_dir / "values.yaml").read_text()) or {}
    files: dict[str, ParsedFile] = {}
    defines: dict[str, tuple[Node, ...]] = {}
    for path in sorted((chart_dir / "templates").rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(chart_dir))
        parsed = parse_template(path.read_text(), rel)
        for name, body in parsed.defines.items():
            if name in defines:
                raise TemplateError(f"{rel}: template {name!r} defined twice in the chart")
            defines[name] = body
        files[rel] = parsed
    for rel, parsed in files.items():
        missing = parsed.includes - set(defines)
        if missing:
            raise TemplateError(f"{rel}: includes undefined template(s) {sorted(missing)}")
    return Chart(chart_dir, metadata, values, files, defines)


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of a values file onto defaults: maps merge, null deletes a key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def render_chart(
    chart: Chart,
    overrides: list[dict[str, Any]] | None = None,
    release_name: str = "semipd",
    namespace: str = "default",
    strict: bool = True,
) -> dict[str, str]:
    """Render every template not starting with `_` (NOTES.txt included), like `helm template`.

    `overrides` are values files applied in order (`-f a.yaml -f b.yaml`). Returns the
    rendered text per template path relative to the chart directory.
    """
    values: dict[str, Any] = chart.values
    for override in overrides or []:
        values = merge_values(values, override)
    meta = chart.metadata
    top = {
        "Values": go_values(values),
        "Release": BuiltinObject(Name=release_name, Namespace=namespace, Service="Helm", IsInstall=True, IsUpgrade=False, Revision=1),
        "Chart": BuiltinObject(
            Name=meta["name"], Version=meta["version"], AppVersion=meta.get("appVersion", ""),
            Description=meta.get("description", ""), Type=meta.get("type", "application"), ApiVersion=meta["apiVersion"],
        ),
    }
    executor = _Executor(chart.defines, strict)
    rendered: dict[str, str] = {}
    for rel, parsed in chart.files.items():
        if Path(rel).name.startswith("_"):
            continue
        dot = dict(top, Template=BuiltinObject(Name=f"{meta['name']}/{rel}", BasePath=f"{meta['name']}/templates"))
        rendered[rel] = executor.run(parsed.nodes, dot)
    return rendered


def render_text(src: str, values: dict[str, Any] | None = None, strict: bool = True) -> str:
    """Render one template string with `.Values` (and its own defines): for testing the renderer."""
    parsed = parse_template(src, "inline")
    dot = {"Values": go_values(values or {}), "Release": BuiltinObject(Name="release", Namespace="default", Service="Helm")}
    return _Executor(parsed.defines, strict).run(parsed.nodes, dot)
