"""How a model writes a tool call, per chat-template family: pure parsers and their inverses.

A format is a pair of pure functions in `TOOL_CALL_FORMATS`:

    parse(text) -> (content_without_calls, calls)     one assistant turn's text
    format(calls, content) -> text                    the inverse: what a model writes

Formats (the model's text is expected decoded with its tool markers kept, i.e. not with
`skip_special_tokens=True`; where a marker may be a special token the parser also accepts the
text without it, as noted):

- `hermes`  (Qwen2.5/Qwen3, Hermes, SmolLM3): one block per call, several per turn,
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
- `llama3`  (Llama-3.1/3.2 JSON tool calls): the whole assistant message is a JSON object
  `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`, several separated
  by `;`. Prose before `<|python_tag|>` is content; without the tag only a message that is
  entirely call objects is a call (a JSON answer without "parameters" is content).
- `mistral` `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, and the newer
  `[TOOL_CALLS]name[ARGS]{...}` form (one marker per call). A whole message that is a JSON
  list of {"name", "arguments"} objects (the marker stripped as a special token) is calls too.

The content is the text without the calls, its surrounding whitespace stripped (the pieces
between calls joined by newlines). A malformed call (bad JSON, no name, arguments not an object, an unterminated block) is still
returned, as a `ToolCall` with `error` set, so the runner tells the model what went wrong.

`detect_tool_format` reads the chat template for these markers; `parse_assistant_turn` prefers
the tokenizer's own declarative `response_template` when it carries one (see its docstring).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class ToolCall:
    """One tool call as the model wrote it: `raw` is its text; `error` says why it could not be
    read (then `name`/`arguments` hold what could be recovered, possibly "" and {})."""

    name: str
    arguments: dict[str, Any]
    raw: str = ""
    error: str | None = None


@dataclass(frozen=True)
class ToolCallFormat:
    """A tool-call syntax: `parse(text) -> (content, calls)`, `format(calls, content) -> text`,
    the chat-template `markers` that identify it, and `syntax`, the call shape stated to a model."""

    name: str
    parse: Callable[[str], tuple[str, list[ToolCall]]]
    format: Callable[[list[ToolCall], str], str]
    markers: tuple[str, ...]
    syntax: str


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def call_from_object(obj: Any, raw: str, arguments_key: str = "arguments") -> ToolCall:
    """A `ToolCall` from a decoded JSON value `{"name": str, arguments_key: {...}}`; anything else
    gives a ToolCall with `error` set. Arguments written as a JSON string are decoded; a missing
    arguments key means no arguments."""
    if not isinstance(obj, dict):
        return ToolCall("", {}, raw, f"expected a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall("", {}, raw, "the call has no \"name\" string")
    arguments = obj.get(arguments_key, {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            return ToolCall(name, {}, raw, f"\"{arguments_key}\" is a string that is not JSON: {err}")
    if not isinstance(arguments, dict):
        return ToolCall(name, {}, raw, f"\"{arguments_key}\" must be a JSON object, got {type(arguments).__name__}")
    return ToolCall(name, arguments, raw)


def call_from_json(text: str, arguments_key: str = "arguments") -> ToolCall:
    """`call_from_object` of `json.loads(text)`; bad JSON gives a ToolCall with `error` set."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return ToolCall("", {}, text, f"the call is not valid JSON: {err}")
    return call_from_object(obj, text, arguments_key)


def _join(*parts: str) -> str:
    return "\n".join(part for part in (p.strip() for p in parts) if part)


# --- hermes -------------------------------------------------------------------------------

HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    """Every `<tool_call>JSON</tool_call>` block is a call; the text around them is the content.
    An opening tag without a closing one (generation cut short) is a malformed call."""
    calls: list[ToolCall] = []
    pieces: list[str] = []
    position = 0
    for match in HERMES_BLOCK.finditer(text):
        pieces.append(text[position:match.start()])
        calls.append(call_from_json(match.group(1).strip()))
        calls[-1].raw = match.group(0)
        position = match.end()
    rest = text[position:]
    cut = rest.find("<tool_call>")
    if cut >= 0:
        calls.append(ToolCall("", {}, rest[cut:], "unterminated <tool_call> (no </tool_call>)"))
        rest = rest[:cut]
    pieces.append(rest)
    return _join(*pieces), calls


def format_hermes(calls: list[ToolCall], content: str = "") -> str:
    blocks = [f"<tool_call>\n{_dumps({'name': c.name, 'arguments': c.arguments})}\n</tool_call>" for c in calls]
    return _join(content, *blocks)


# --- llama3 -------------------------------------------------------------------------------

PYTHON_TAG = "<|python_tag|>"


def _json_values(text: str, separator: str) -> tuple[list[tuple[Any, str]], str]:
    """JSON values at the start of `text`, separated by `separator` (and whitespace), each with
    its raw text, and the remainder from the first point that is not one ("" when all was)."""
    decoder = json.JSONDecoder()
    values: list[tuple[Any, str]] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return values, ""
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return values, text[position:]
        values.append((value, text[position:end]))
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
        if position < len(text) and text[position] != separator:
            return values, text[position:]
        position += 1


def _is_llama_call(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("name"), str) and (
        "parameters" in value or "arguments" in value)


def _llama_call(value: Any, raw: str) -> ToolCall:
    key = "parameters" if isinstance(value, dict) and "parameters" in value else "arguments"
    return call_from_object(value, raw, key)


def parse_llama3(text: str) -> tuple[str, list[ToolCall]]:
    """After `<|python_tag|>` everything is calls (`;`-separated JSON objects; text there that is
    not one is a malformed call) and the text before it is content; without the tag the message
    is calls only when it is entirely `{"name", "parameters"}` objects."""
    before, tag, after = text.partition(PYTHON_TAG)
    if not tag:
        values, rest = _json_values(text, ";")
        if values and not rest and all(_is_llama_call(value) for value, _ in values):
            return "", [_llama_call(value, raw) for value, raw in values]
        return text.strip(), []
    values, rest = _json_values(after, ";")
    calls = [_llama_call(value, raw) for value, raw in values]
    if rest.strip():
        # an object that failed to decode says why; other text says what was expected
        calls.append(call_from_json(rest.strip(), "parameters") if rest.lstrip().startswith("{") else
                     ToolCall("", {}, rest.strip(), f"after {PYTHON_TAG} expected JSON call objects separated by ';'"))
    return before.strip(), calls


def format_llama3(calls: list[ToolCall], content: str = "") -> str:
    body = "; ".join(_dumps({"name": c.name, "parameters": c.arguments}) for c in calls)
    return f"{content.strip()}{PYTHON_TAG}{body}" if content.strip() else body


# --- mistral ------------------------------------------------------------------------------

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"


def _mistral_segment(segment: str) -> tuple[list[ToolCall], str]:
    """The calls at the start of the text after one `[TOOL_CALLS]`, and the text left after them."""
    body = segment.lstrip()
    decoder = json.JSONDecoder()
    if body.startswith("["):
        try:
            value, end = decoder.raw_decode(body)
        except json.JSONDecodeError as err:
            return [ToolCall("", {}, body, f"the call list is not valid JSON: {err}")], ""
        items = value if isinstance(value, list) else [value]
        return [call_from_object(item, _dumps(item)) for item in items], body[end:]
    name, args_marker, after = body.partition(ARGS)
    if args_marker and name.strip() and not any(ch.isspace() for ch in name.strip()):
        arguments_text = after.lstrip()
        try:
            value, end = decoder.raw_decode(arguments_text)
        except json.JSONDecodeError as err:
            return [ToolCall(name.strip(), {}, body, f"the arguments are not valid JSON: {err}")], ""
        raw = body[:len(body) - len(arguments_text) + end]
        return [call_from_object({"name": name.strip(), "arguments": value}, raw)], arguments_text[end:]
    return [ToolCall("", {}, body, f"expected a JSON list or name{ARGS}{{...}} after {TOOL_CALLS}")], ""


def parse_mistral(text: str) -> tuple[str, list[ToolCall]]:
    """Each `[TOOL_CALLS]` starts calls (a JSON list, or `name[ARGS]{...}`); the text before the
    first marker, and any text after the calls, is content."""
    head, *segments = text.split(TOOL_CALLS)
    if not segments:
        values, rest = _json_values(text, ";")
        items = values[0][0] if len(values) == 1 and not rest else None
        if isinstance(items, list) and items and all(
                isinstance(v, dict) and isinstance(v.get("name"), str) and "arguments" in v for v in items):
            return "", [call_from_object(item, _dumps(item)) for item in items]
        return text.strip(), []
    calls: list[ToolCall] = []
    leftovers = [head]
    for segment in segments:
        segment_calls, rest = _mistral_segment(segment)
        calls.extend(segment_calls)
        leftovers.append(rest)
    return _join(*leftovers), calls


def format_mistral(calls: list[ToolCall], content: str = "") -> str:
    body = _dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
    return f"{content.strip()}{TOOL_CALLS}{body}"


TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {
    "hermes": ToolCallFormat(
        "hermes", parse_hermes, format_hermes, ("<tool_call>",),
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'),
    "llama3": ToolCallFormat(
        "llama3", parse_llama3, format_llama3, (PYTHON_TAG, '"parameters"'),
        '{"name": <function-name>, "parameters": <args-json-object>}'),
    "mistral": ToolCallFormat(
        "mistral", parse_mistral, format_mistral, (TOOL_CALLS,),
        '[TOOL_CALLS][{"name": <function-name>, "arguments": <args-json-object>}]'),
}
FALLBACK_FORMAT = "hermes"
# Detection order: the most specific marker first (a Llama template may mention "parameters"
# in prose; `<tool_call>` and `[TOOL_CALLS]` are unambiguous).
DETECTION_ORDER = ("mistral", "hermes", "llama3")


def tool_call_format(fmt: str) -> ToolCallFormat:
    if fmt not in TOOL_CALL_FORMATS:
        raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {', '.join(TOOL_CALL_FORMATS)}")
    return TOOL_CALL_FORMATS[fmt]


def format_tool_call(call: ToolCall, fmt: str) -> str:
    """What a model writes to make `call` in format `fmt` (the inverse of its parser)."""
    return tool_call_format(fmt).format([call], "")


def format_tool_calls(calls: list[ToolCall], fmt: str, content: str = "") -> str:
    """A whole assistant turn in format `fmt`: `content` then every call of `calls`."""
    return tool_call_format(fmt).format(list(calls), content)


def chat_template_text(tokenizer_or_template: Any) -> str:
    """The chat template as one string: a string itself, or `.chat_template` (a dict of named
    templates is joined; None is "")."""
    template = tokenizer_or_template
    if not isinstance(template, (str, dict)) and template is not None:
        template = getattr(template, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def detect_tool_format(tokenizer_or_template: Any) -> str:
    """The tool-call format a chat template speaks, from its markers (`[TOOL_CALLS]` -> mistral,
    `<tool_call>` -> hermes, `<|python_tag|>` or `"parameters"` -> llama3); a template without
    tool support falls back to "hermes" (the tools are then stated in the system prompt, see
    `tools_system_prompt`)."""
    text = chat_template_text(tokenizer_or_template)
    for fmt in DETECTION_ORDER:
        if any(marker in text for marker in TOOL_CALL_FORMATS[fmt].markers):
            return fmt
    return FALLBACK_FORMAT


def template_supports_tools(tokenizer_or_template: Any) -> bool:
    """Whether the chat template renders tools itself (it reads a `tools` variable and has a
    tool-call marker); otherwise describe them with `tools_system_prompt`."""
    text = chat_template_text(tokenizer_or_template)
    has_marker = any(m in text for f in TOOL_CALL_FORMATS.values() for m in f.markers)
    return has_marker and re.search(r"\btools\b", text) is not None


EXAMPLE_VALUES = {"string": "...", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}


def example_call(schema: dict[str, Any]) -> ToolCall:
    """A call to the tool described by `schema` (get_json_schema's dict) with a placeholder value
    of each required parameter's type."""
    function = schema.get("function", schema)
    parameters = function.get("parameters", {})
    properties = parameters.get("properties", {})
    required = parameters.get("required", list(properties))
    arguments = {name: EXAMPLE_VALUES.get(properties[name].get("type"), "...") for name in required
                 if name in properties}
    return ToolCall(function.get("name", "tool"), arguments)


def tools_system_prompt(schemas: list[dict[str, Any]], fmt: str) -> str:
    """A system-prompt text stating the tools (one JSON schema per line) and the exact call
    syntax of `fmt`, with an example call; for templates that do not render tools themselves."""
    spec = tool_call_format(fmt)
    if not schemas:
        raise ValueError("tools_system_prompt: no tool schemas given")
    listing = "\n".join(_dumps(schema) for schema in schemas)
    return (
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call a function, write exactly:\n"
        f"{spec.syntax}\n\n"
        "For example:\n"
        f"{format_tool_call(example_call(schemas[0]), fmt)}\n\n"
        "The result comes back in the next message. When you have the answer, reply without a call."
    )


def assistant_message(content: str, calls: list[ToolCall]) -> dict[str, Any]:
    """The assistant turn in transformers' chat format; "tool_calls" only when there are calls
    (malformed ones included with what was recovered: the tool replies say what was wrong)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)}}
                                 for c in calls]
    return message


def calls_from_parsed_message(parsed: dict[str, Any]) -> tuple[str, list[ToolCall]]:
    """(content, calls) from a message dict as `tokenizer.parse_response` returns it:
    `{"content": ..., "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]}`."""
    content = parsed.get("content") or ""
    calls = []
    for entry in parsed.get("tool_calls") or []:
        function = entry.get("function", entry) if isinstance(entry, dict) else entry
        calls.append(call_from_object(function, _dumps(function) if isinstance(function, dict) else str(function)))
    return (content if isinstance(content, str) else str(content)).strip(), calls


def parse_assistant_turn(text: str, fmt: str, tokenizer: Any = None, prefix: str = "") -> tuple[str, list[ToolCall]]:
    """(content, calls) of one assistant turn.

    transformers 5.25 has declarative response parsing: a tokenizer may carry a
    `response_template` (dict: `start_anchor`, `fields` with `content`/`tool_calls`/
    `reasoning_content` regions) and `tokenizer.parse_response(text, prefix=...)` turns a
    generation into `{"role", "content", "tool_calls": [{"type": "function", "function":
    {"name", "arguments"}}], "reasoning_content"?}`. (The older `response_schema` attribute is
    dropped by transformers on load; few Hub tokenizers ship a `response_template` yet, and
    `transformers serve` keeps its own per-model_type fallbacks.) When `tokenizer` has one we use
    it (`prefix` is the prompt text, "" for none); its reasoning region is then not part of the
    content. It raises on one malformed call for the whole turn, so then, and when there is no
    template, `TOOL_CALL_FORMATS[fmt]` parses, which reports malformed calls one by one.
    """
    template = getattr(tokenizer, "response_template", None) if tokenizer is not None else None
    if template:
        try:
            parsed = tokenizer.parse_response(text, prefix=prefix)
        except (ValueError, KeyError, TypeError, AttributeError):
            parsed = None
        if isinstance(parsed, dict):
            return calls_from_parsed_message(parsed)
    return tool_call_format(fmt).parse(text)
