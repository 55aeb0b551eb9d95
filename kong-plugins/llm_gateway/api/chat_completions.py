"""Validation of OpenAI chat-completion requests, so bad input gets a precise 400 before any provider call.

The checks follow OpenAI's ``CreateChatCompletionRequest`` (its published OpenAPI schema): every request field
it defines is admitted, with the type and range the schema gives, and the shapes of ``messages`` (per role,
content parts by type), ``tools``, ``tool_choice`` and ``response_format`` are checked, so a request LiteLLM
could not translate never reaches it. Unknown top-level fields are refused by name, never dropped: a client
that sets a parameter expects it to matter. Whether a deployment can honour a parameter is decided later,
per deployment, in ``providers`` (forwarded, translated by LiteLLM, dropped when the alias says so and
reported in a header, or refused naming it).

The body is read as every endpoint reads it (``api/request_body.py``: bounded JSON, one object naming its
model, no unknown field).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from llm_gateway.accounting.tokens import estimate_prompt_tokens
from llm_gateway.api.base import OPENAI_ERRORS
from llm_gateway.api.request_body import refuse_unknown, request_object
from llm_gateway.config import Deployment
from llm_gateway.errors import bad_request
from llm_gateway.providers import chat
from llm_gateway.providers.openai_compatible import Usage

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
# content part types each role may send (ChatCompletionRequest*MessageContentPart in the schema)
PART_TYPES = {
    "system": frozenset({"text"}), "developer": frozenset({"text"}), "tool": frozenset({"text"}),
    "user": frozenset({"text", "image_url", "input_audio", "file"}),
    "assistant": frozenset({"text", "refusal"}),
}
# OpenAI allows [A-Za-z0-9_-]{1,64}; other upstreams differ (Anthropic: 128), so only the shape is checked
_FUNCTION_NAME = re.compile(r"^\S{1,256}$")

Check = Callable[[Any], str | None]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _range(lo: float, hi: float) -> Check:
    def check(v: Any) -> str | None:
        return None if _is_number(v) and lo <= v <= hi else f"expected a number between {lo:g} and {hi:g}"
    return check


def _int_range(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        return None if _is_int(v) and lo <= v <= hi else f"expected an integer from {lo} to {hi}"
    return check


def _positive_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 1 else "expected an integer of at least 1"


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else "expected a string"


def _one_of(*values: str) -> Check:
    def check(v: Any) -> str | None:
        return None if isinstance(v, str) and v in values else f"expected one of {', '.join(values)}"
    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected a boolean"


def _dict(v: Any) -> str | None:
    return None if isinstance(v, dict) else "expected an object"


def _stop(v: Any) -> str | None:
    if isinstance(v, str) or (isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) for s in v)):
        return None
    return "expected a string or a list of at most 4 strings"


def _response_format(v: Any) -> str | None:
    if not isinstance(v, dict) or not isinstance(v.get("type"), str) or v["type"] not in RESPONSE_FORMATS:
        return "expected an object whose type is one of text, json_object, json_schema"
    if v["type"] == "json_schema":
        spec = v.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            return "json_schema requires a 'json_schema' object with a 'name'"
        if "schema" in spec and not isinstance(spec["schema"], dict):
            return "'json_schema.schema' must be a JSON Schema object"
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            return "'json_schema.strict' must be a boolean"
    return None


def _function(f: Any, *, needs_parameters_object: bool = True) -> str | None:
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not _FUNCTION_NAME.match(f["name"]):
        return "a function needs a 'name' (a string without spaces)"
    if f.get("description") is not None and not isinstance(f["description"], str):
        return "a function's 'description' must be a string"
    if needs_parameters_object and f.get("parameters") is not None and not isinstance(f["parameters"], dict):
        return "a function's 'parameters' must be a JSON Schema object"
    if f.get("strict") is not None and not isinstance(f["strict"], bool):
        return "a function's 'strict' must be a boolean"
    return None


def _tools(v: Any) -> str | None:
    if not isinstance(v, list):
        return "expected a list of tools"
    for i, tool in enumerate(v):
        if not isinstance(tool, dict) or tool.get("type") not in ("function", "custom"):
            return f"tools[{i}] must be an object whose type is function or custom"
        if tool["type"] == "function" and (error := _function(tool.get("function"))):
            return f"tools[{i}].function: {error}"
        if tool["type"] == "custom":
            custom = tool.get("custom")
            if not isinstance(custom, dict) or not isinstance(custom.get("name"), str):
                return f"tools[{i}].custom needs a 'name'"
    return None


def _functions(v: Any) -> str | None:
    if not isinstance(v, list) or not 1 <= len(v) <= 128:
        return "expected a list of 1 to 128 functions"
    for i, f in enumerate(v):
        if error := _function(f):
            return f"functions[{i}]: {error}"
    return None


def _named(v: Any, kind: str) -> bool:
    return isinstance(v.get(kind), dict) and isinstance(v[kind].get("name"), str)


def _tool_choice(v: Any) -> str | None:
    if v in ("none", "auto", "required"):
        return None
    if isinstance(v, dict):
        kind = v.get("type")
        if kind in ("function", "custom") and _named(v, kind):
            return None
        allowed = v.get("allowed_tools")
        if kind == "allowed_tools" and isinstance(allowed, dict) and allowed.get("mode") in ("auto", "required") \
                and isinstance(allowed.get("tools"), list) and all(isinstance(t, dict) for t in allowed["tools"]):
            return None
    return "expected none, auto, required or a {type: function, function: {name}} object"


def _function_call(v: Any) -> str | None:
    if v in ("none", "auto") or (isinstance(v, dict) and isinstance(v.get("name"), str)):
        return None
    return "expected none, auto or a {name} object"


def _metadata(v: Any) -> str | None:
    if isinstance(v, dict) and len(v) <= 16 and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(x, str) and len(x) <= 512 for k, x in v.items()):
        return None
    return "expected an object of at most 16 string values (keys up to 64, values up to 512 characters)"


def _logit_bias(v: Any) -> str | None:
    if isinstance(v, dict) and all(_is_int(x) and -100 <= x <= 100 for x in v.values()):
        return None
    return "expected an object mapping token ids to integers from -100 to 100"


def _modalities(v: Any) -> str | None:
    if isinstance(v, list) and all(m in ("text", "audio") for m in v):
        return None
    return "expected a list of 'text' and 'audio'"


def _audio(v: Any) -> str | None:
    if isinstance(v, dict) and isinstance(v.get("format"), str) and isinstance(v.get("voice"), str | dict):
        return None
    return "expected an object with 'voice' and 'format'"


def _prediction(v: Any) -> str | None:
    if isinstance(v, dict) and v.get("type") == "content" and isinstance(v.get("content"), str | list):
        return None
    return "expected {type: content, content: ...}"


def _stream_options(v: Any) -> str | None:
    if not isinstance(v, dict) or not all(isinstance(v.get(k, False), bool)
                                          for k in ("include_usage", "include_obfuscation")):
        return "expected an object like {include_usage: true}"
    return None


# Every request field of CreateChatCompletionRequest but the gateway's own (GATEWAY_FIELDS), with its check.
# A value of null means the parameter's default: it is not sent on.
PARAMETERS: dict[str, Check] = {
    "temperature": _range(0, 2),
    "top_p": _range(0, 1),
    "presence_penalty": _range(-2, 2),
    "frequency_penalty": _range(-2, 2),
    "max_tokens": _positive_int,
    "max_completion_tokens": _positive_int,
    "n": _int_range(1, 128),
    "seed": _int_range(-(2 ** 63), 2 ** 63 - 1),
    "stop": _stop,
    "reasoning_effort": _one_of("none", "minimal", "low", "medium", "high", "xhigh", "max"),
    "verbosity": _one_of("low", "medium", "high"),
    "response_format": _response_format,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _boolean,
    "functions": _functions,
    "function_call": _function_call,
    "user": _string,
    "safety_identifier": _string,
    "prompt_cache_key": _string,
    "prompt_cache_retention": _one_of("in_memory", "24h"),
    "prompt_cache_options": _dict,
    "logprobs": _boolean,
    "top_logprobs": _int_range(0, 20),
    "logit_bias": _logit_bias,
    "metadata": _metadata,
    "store": _boolean,
    "service_tier": _one_of("auto", "default", "flex", "scale", "priority", "fast"),
    "modalities": _modalities,
    "audio": _audio,
    "prediction": _prediction,
    "web_search_options": _dict,
    "moderation": lambda v: None if isinstance(v, dict) and isinstance(v.get("model"), str)
    else "expected an object with a moderation 'model'",
}
# parameters that mean nothing without another (OpenAI refuses them alone; LiteLLM would drop them silently)
REQUIRES = {"tool_choice": "tools", "parallel_tool_calls": "tools", "function_call": "functions"}
GATEWAY_FIELDS = frozenset({"model", "messages", "stream", "stream_options"})


@dataclass(frozen=True)
class ChatRequest:
    """A validated request: the alias asked for, whether to stream, and what goes to the provider."""

    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk (it is always requested upstream)
    params: dict[str, Any]  # messages and the parameters set (not null), as given; for streams, the client's
    # stream_options other than include_usage (which is always requested upstream)
    endpoint: str = "chat.completions"
    limit_keys: tuple[str, ...] = ("max_tokens", "max_completion_tokens")

    def prompt_tokens(self, model: str) -> int:
        return estimate_prompt_tokens(model, self.params["messages"])

    def chat_view(self) -> dict[str, Any]:
        return self.params


def _part_error(part: Any, allowed: frozenset[str]) -> tuple[str, str] | None:
    """(sub-path, problem) for a content part that does not match its type's shape."""
    if not isinstance(part, dict):
        return "", "must be a content part object"
    kind = part.get("type")
    if not isinstance(kind, str) or kind not in allowed:
        return ".type", f"must be one of {', '.join(sorted(allowed))}"
    if kind == "text" and not isinstance(part.get("text"), str):
        return ".text", "must be a string"
    if kind == "refusal" and not isinstance(part.get("refusal"), str):
        return ".refusal", "must be a string"
    if kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            return ".image_url", "must be an object with a 'url' string"
        if image.get("detail") not in (None, "auto", "low", "high"):
            return ".image_url.detail", "must be one of auto, low, high"
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str) \
                or not isinstance(audio.get("format"), str):
            return ".input_audio", "must be an object with 'data' and 'format' strings"
    if kind == "file":
        file = part.get("file")
        if not isinstance(file, dict) or not any(isinstance(file.get(k), str)
                                                 for k in ("file_data", "file_id", "filename")):
            return ".file", "must be an object with 'file_data', 'file_id' or 'filename'"
    return None


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise bad_request(f"'{where}' must be a list of tool calls", param=where)
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("id"), str):
            raise bad_request(f"'{at}' must be an object with an 'id' string", param=at)
        kind = call.get("type", "function")
        if kind == "function":
            function = call.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                    or not isinstance(function.get("arguments"), str):
                raise bad_request(f"'{at}.function' must be an object with 'name' and 'arguments' strings",
                                  param=f"{at}.function")
        elif kind == "custom":
            custom = call.get("custom")
            if not isinstance(custom, dict) or not isinstance(custom.get("name"), str) \
                    or not isinstance(custom.get("input"), str):
                raise bad_request(f"'{at}.custom' must be an object with 'name' and 'input' strings",
                                  param=f"{at}.custom")
        else:
            raise bad_request(f"'{at}.type' must be function or custom", param=f"{at}.type")


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise bad_request(f"'{where}' must be an object", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}", param=f"{where}.role")
    if message.get("name") is not None and not isinstance(message["name"], str):
        raise bad_request(f"'{where}.name' must be a string", param=f"{where}.name")
    content = message.get("content")
    if role == "assistant":
        if message.get("tool_calls") is not None:
            _check_tool_calls(message["tool_calls"], f"{where}.tool_calls")
        call = message.get("function_call")
        if call is not None and (not isinstance(call, dict) or not isinstance(call.get("name"), str)
                                 or not isinstance(call.get("arguments"), str)):
            raise bad_request(f"'{where}.function_call' must be an object with 'name' and 'arguments' strings",
                              param=f"{where}.function_call")
        if message.get("refusal") is not None and not isinstance(message["refusal"], str):
            raise bad_request(f"'{where}.refusal' must be a string", param=f"{where}.refusal")
        if content is None and not (message.get("tool_calls") or call or message.get("audio")):
            raise bad_request(f"'{where}.content' is required without tool_calls", param=f"{where}.content")
    elif content is None and role != "function":
        raise bad_request(f"'{where}.content' is required", param=f"{where}.content")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise bad_request(f"'{where}.tool_call_id' is required in a tool message", param=f"{where}.tool_call_id")
    if role == "function" and not isinstance(message.get("name"), str):
        raise bad_request(f"'{where}.name' is required in a function message", param=f"{where}.name")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list) or (role == "function"):
        raise bad_request(f"'{where}.content' must be a string or a list of content parts",
                          param=f"{where}.content")
    allowed = PART_TYPES.get(role, frozenset())
    for j, part in enumerate(content):
        if problem := _part_error(part, allowed):
            at = f"{where}.content[{j}]{problem[0]}"
            raise bad_request(f"'{at}' {problem[1]}", param=at)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of message objects", param="messages")
    for i, message in enumerate(messages):
        _check_message(message, f"messages[{i}]")


def parse_chat_request(body: bytes) -> ChatRequest:
    """Parse and validate a request body; raises GatewayError(400) naming the offending parameter."""
    data, model = request_object(body)
    _check_messages(data.get("messages"))
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    stream_options = data.get("stream_options")
    if stream_options is not None and (error := _stream_options(stream_options)):
        raise bad_request(f"'stream_options': {error}", param="stream_options")
    refuse_unknown(data, PARAMETERS.keys() | GATEWAY_FIELDS)
    params: dict[str, Any] = {"messages": data["messages"]}
    for name, check in PARAMETERS.items():
        if name in data and data[name] is not None:
            if error := check(data[name]):
                raise bad_request(f"'{name}': {error}", param=name)
            params[name] = data[name]
    if params.get("top_logprobs") is not None and params.get("logprobs") is not True:
        raise bad_request("'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    for name, needed in REQUIRES.items():
        if name in params and not params.get(needed):
            raise bad_request(f"'{name}' is only allowed when '{needed}' are given", param=name)
    if stream and stream_options and (others := {k: v for k, v in stream_options.items() if k != "include_usage"}):
        params["stream_options"] = others
    return ChatRequest(model=model, stream=stream,
                       include_usage=bool(stream and stream_options and stream_options.get("include_usage")),
                       params=params)


class ChatCompletions:
    """``POST /v1/chat/completions``: OpenAI's format in and out, on every provider (providers/chat.py)."""

    name = "chat.completions"
    path = "/v1/chat/completions"
    errors = OPENAI_ERRORS
    stream_end = b"data: [DONE]\n\n"

    def parse(self, body: bytes) -> ChatRequest:
        return parse_chat_request(body)

    async def complete(self, deployment: Deployment, request: ChatRequest, usage: Usage) -> bytes:  # type: ignore[override]
        return await chat.complete(deployment, request.params, usage)

    async def open_stream(self, deployment: Deployment, request: ChatRequest,  # type: ignore[override]
                          usage: Usage) -> AsyncIterator[bytes]:
        return await chat.open_stream(deployment, request.params, request.include_usage, usage)


ENDPOINT = ChatCompletions()
