"""Validation of OpenAI chat-completion requests, so bad input gets a precise 400 before any provider call.

The checks follow OpenAI's API reference: types and ranges of the sampling parameters, the shape of
``messages``, ``tools`` and ``response_format``. Unknown top-level parameters are refused by name rather than
silently dropped: a client that sets a parameter expects it to matter.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_gateway.errors import GatewayError, bad_request

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _range(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if _is_number(v) and lo <= v <= hi else f"expected a number between {lo:g} and {hi:g}"
    return check


def _positive_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 1 else "expected an integer of at least 1"


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else "expected a string"


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected a boolean"


def _stop(v: Any) -> str | None:
    if isinstance(v, str) or (isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) for s in v)):
        return None
    return "expected a string or a list of at most 4 strings"


def _response_format(v: Any) -> str | None:
    if not isinstance(v, dict) or v.get("type") not in RESPONSE_FORMATS:
        return "expected an object whose type is one of text, json_object, json_schema"
    if v["type"] == "json_schema" and not isinstance(v.get("json_schema"), dict):
        return "json_schema requires a 'json_schema' object"
    return None


def _tools(v: Any) -> str | None:
    if not isinstance(v, list) or not all(
        isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str) for t in v
    ):
        return "expected a list of {type: function, function: {name, ...}} objects"
    return None


def _tool_choice(v: Any) -> str | None:
    if v in ("none", "auto", "required") or (isinstance(v, dict) and v.get("type") == "function"):
        return None
    return "expected none, auto, required or a {type: function, function: {name}} object"


def _dict(v: Any) -> str | None:
    return None if isinstance(v, dict) else "expected an object"


def _stream_options(v: Any) -> str | None:
    if not isinstance(v, dict) or not isinstance(v.get("include_usage", False), bool):
        return "expected an object like {include_usage: true}"
    return None


# parameter → check; all of these pass through to the provider as given
PARAMETERS: dict[str, Callable[[Any], str | None]] = {
    "temperature": _range(0, 2),
    "top_p": _range(0, 1),
    "presence_penalty": _range(-2, 2),
    "frequency_penalty": _range(-2, 2),
    "max_tokens": _positive_int,
    "max_completion_tokens": _positive_int,
    "n": _positive_int,
    "seed": lambda v: None if _is_int(v) else "expected an integer",
    "stop": _stop,
    "reasoning_effort": _string,
    "response_format": _response_format,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _boolean,
    "user": _string,
    "logprobs": _boolean,
    "top_logprobs": lambda v: None if _is_int(v) and 0 <= v <= 20 else "expected an integer from 0 to 20",
    "logit_bias": _dict,
    "metadata": _dict,
}
GATEWAY_FIELDS = frozenset({"model", "messages", "stream", "stream_options"})


@dataclass(frozen=True)
class ChatRequest:
    """A validated request: the alias asked for, whether to stream, and what goes to the provider."""

    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk (it is always requested upstream)
    params: dict[str, Any]  # messages and the sampling parameters, passed through as given


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of message objects", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{where}' must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}", param=f"{where}.role")
        content = message.get("content")
        if content is None and not (role == "assistant" and (message.get("tool_calls")
                                                             or message.get("function_call"))):
            raise bad_request(f"'{where}.content' is required", param=f"{where}.content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(f"'{where}.content' must be a string or a list of content parts",
                              param=f"{where}.content")


def parse_chat_request(body: bytes) -> ChatRequest:
    """Parse and validate a request body; raises GatewayError(400) naming the offending parameter."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", param="model")
    _check_messages(data.get("messages"))
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    stream_options = data.get("stream_options")
    if stream_options is not None and (error := _stream_options(stream_options)):
        raise bad_request(f"'stream_options': {error}", param="stream_options")
    unknown = sorted(k for k in data if k not in PARAMETERS and k not in GATEWAY_FIELDS)
    if unknown:
        raise GatewayError(400, f"Unsupported parameter(s): {', '.join(unknown)}", param=unknown[0],
                           code="unsupported_parameter")
    params: dict[str, Any] = {"messages": data["messages"]}
    for name, check in PARAMETERS.items():
        if name in data and data[name] is not None:
            if error := check(data[name]):
                raise bad_request(f"'{name}': {error}", param=name)
            params[name] = data[name]
    return ChatRequest(model=model, stream=stream,
                       include_usage=bool(stream and stream_options and stream_options.get("include_usage")),
                       params=params)
