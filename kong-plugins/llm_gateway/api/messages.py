"""``POST /v1/messages``: Anthropic's Messages API, validated here so bad input gets a precise 400 in Anthropic's
error shape before any provider call, and served from any deployment (``providers.messages``).

The checks follow Anthropic's Messages API reference: ``model`` and ``max_tokens`` are required, ``messages``
alternate user and assistant turns whose content is a string or blocks (text, image, document, tool_use,
tool_result, thinking, redacted_thinking; each where its role may send it), and ``system``, ``tools``,
``tool_choice``, ``thinking``, the sampling parameters, ``stop_sequences``, ``metadata`` and ``service_tier``
have the shapes the reference gives. Unknown top-level fields are refused by name, never dropped, as on chat
completions. Parsing is bounded the same way (``api/request_body.py``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from llm_gateway.accounting.tokens import estimate_prompt_tokens, rough_tokens
from llm_gateway.api.base import ANTHROPIC_ERRORS
from llm_gateway.api.request_body import refuse_unknown, request_object
from llm_gateway.config import Deployment
from llm_gateway.errors import bad_request
from llm_gateway.providers import messages as provider
from llm_gateway.providers.openai_compatible import Usage

log = logging.getLogger("llm_gateway.api.messages")

ROLES = frozenset({"user", "assistant"})
# the content blocks each role may send (Anthropic's MessageParam content)
BLOCKS = {"user": frozenset({"text", "image", "document", "tool_result", "search_result"}),
          "assistant": frozenset({"text", "tool_use", "thinking", "redacted_thinking"})}
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
TOOL_RESULT_BLOCKS = frozenset({"text", "image", "document", "search_result"})
# Anthropic allows ^[a-zA-Z0-9_-]{1,128}$ for a client tool's name; other upstreams differ, so only the shape
_TOOL_NAME = re.compile(r"^\S{1,128}$")
MIN_THINKING_BUDGET = 1024  # Anthropic's minimum budget_tokens

Check = Callable[[Any], str | None]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _unit_interval(v: Any) -> str | None:
    return None if _is_number(v) and 0 <= v <= 1 else "expected a number between 0 and 1"


def _non_negative_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else "expected an integer of at least 0"


def _positive_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 1 else "expected an integer of at least 1"


def _cache_control(v: Any) -> str | None:
    if isinstance(v, dict) and v.get("type") == "ephemeral" and v.get("ttl") in (None, "5m", "1h") \
            and set(v) <= {"type", "ttl"}:
        return None
    return "must be {type: ephemeral} (with an optional ttl of 5m or 1h)"


def _stop_sequences(v: Any) -> str | None:
    if isinstance(v, list) and all(isinstance(s, str) and s for s in v):
        return None
    return "expected a list of non-empty strings"


def _metadata(v: Any) -> str | None:
    if isinstance(v, dict) and set(v) <= {"user_id"} and (v.get("user_id") is None or isinstance(v["user_id"], str)):
        return None
    return "expected an object with at most a 'user_id' string"


def _service_tier(v: Any) -> str | None:
    return None if v in ("auto", "standard_only") else "expected auto or standard_only"


def _text_block(block: dict[str, Any]) -> tuple[str, str] | None:
    if not isinstance(block.get("text"), str):
        return ".text", "must be a string"
    if block.get("citations") is not None and not isinstance(block["citations"], list):
        return ".citations", "must be a list"
    return None


def _image_block(block: dict[str, Any]) -> tuple[str, str] | None:
    source = block.get("source")
    if not isinstance(source, dict):
        return ".source", "must be an object whose type is base64 or url"
    if source.get("type") == "base64":
        if not isinstance(source.get("media_type"), str) or source.get("media_type") not in IMAGE_TYPES:
            return ".source.media_type", f"must be one of {', '.join(sorted(IMAGE_TYPES))}"
        if not isinstance(source.get("data"), str) or not source["data"]:
            return ".source.data", "must be base64 image data"
        return None
    if source.get("type") == "url":
        if not isinstance(source.get("url"), str) or not source["url"].startswith(("https://", "http://")):
            return ".source.url", "must be an http(s) URL"
        return None
    if source.get("type") == "file" and isinstance(source.get("file_id"), str):
        return None
    return ".source.type", "must be base64, url or file"


def _document_block(block: dict[str, Any]) -> tuple[str, str] | None:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        if source.get("media_type") != "application/pdf" or not isinstance(source.get("data"), str):
            return ".source", "a base64 document needs media_type application/pdf and 'data'"
    elif kind == "text":
        if source.get("media_type") != "text/plain" or not isinstance(source.get("data"), str):
            return ".source", "a text document needs media_type text/plain and 'data'"
    elif kind == "url":
        if not isinstance(source.get("url"), str):
            return ".source.url", "must be a URL string"
    elif kind == "content":
        if not isinstance(source.get("content"), str | list):
            return ".source.content", "must be a string or a list of text and image blocks"
    elif kind == "file":
        if not isinstance(source.get("file_id"), str):
            return ".source.file_id", "must be a string"
    else:
        return ".source", "must be an object whose type is base64, text, url, content or file"
    for key in ("title", "context"):
        if block.get(key) is not None and not isinstance(block[key], str):
            return f".{key}", "must be a string"
    if block.get("citations") is not None and not isinstance(block["citations"], dict):
        return ".citations", "must be an object like {enabled: true}"
    return None


def _tool_use_block(block: dict[str, Any]) -> tuple[str, str] | None:
    if not isinstance(block.get("id"), str) or not block["id"]:
        return ".id", "must be a non-empty string"
    if not isinstance(block.get("name"), str) or not _TOOL_NAME.match(block["name"]):
        return ".name", "must be a tool name (a string without spaces)"
    if not isinstance(block.get("input"), dict):
        return ".input", "must be an object"
    return None


def _tool_result_block(block: dict[str, Any]) -> tuple[str, str] | None:
    if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
        return ".tool_use_id", "must be a non-empty string"
    if block.get("is_error") is not None and not isinstance(block["is_error"], bool):
        return ".is_error", "must be a boolean"
    content = block.get("content")
    if content is None or isinstance(content, str):
        return None
    if not isinstance(content, list):
        return ".content", "must be a string or a list of blocks"
    for j, inner in enumerate(content):
        if problem := _block_error(inner, TOOL_RESULT_BLOCKS):
            return f".content[{j}]{problem[0]}", problem[1]
    return None


def _thinking_block(block: dict[str, Any]) -> tuple[str, str] | None:
    if not isinstance(block.get("thinking"), str):
        return ".thinking", "must be a string"
    if not isinstance(block.get("signature"), str):
        return ".signature", "must be a string (the signature the model sent with this thinking)"
    return None


def _redacted_thinking_block(block: dict[str, Any]) -> tuple[str, str] | None:
    return None if isinstance(block.get("data"), str) else (".data", "must be a string")


def _search_result_block(block: dict[str, Any]) -> tuple[str, str] | None:
    if not isinstance(block.get("source"), str) or not isinstance(block.get("title"), str):
        return "", "needs 'source' and 'title' strings"
    if not isinstance(block.get("content"), list):
        return ".content", "must be a list of text blocks"
    return None


BLOCK_CHECKS: dict[str, Callable[[dict[str, Any]], tuple[str, str] | None]] = {
    "text": _text_block, "image": _image_block, "document": _document_block, "tool_use": _tool_use_block,
    "tool_result": _tool_result_block, "thinking": _thinking_block, "redacted_thinking": _redacted_thinking_block,
    "search_result": _search_result_block,
}


def _block_error(block: Any, allowed: frozenset[str]) -> tuple[str, str] | None:
    """(sub-path, problem) for a content block that does not match its type's shape."""
    if not isinstance(block, dict):
        return "", "must be a content block object"
    kind = block.get("type")
    if not isinstance(kind, str) or kind not in allowed:
        return ".type", f"must be one of {', '.join(sorted(allowed))}"
    if problem := BLOCK_CHECKS[kind](block):
        return problem
    if "cache_control" in block and block["cache_control"] is not None \
            and (error := _cache_control(block["cache_control"])):
        return ".cache_control", error
    return None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of message objects", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{where}' must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"'{where}.role' must be user or assistant (the system prompt goes in 'system')",
                              param=f"{where}.role")
        if extra := sorted(k for k in message if k not in ("role", "content")):
            at = f"{where}.{extra[0][:64]}"
            raise bad_request(f"'{at}' is not a field of a message", param=at)
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise bad_request(f"'{where}.content' must be a string or a list of content blocks",
                              param=f"{where}.content")
        for j, block in enumerate(content):
            if problem := _block_error(block, BLOCKS[role]):
                at = f"{where}.content[{j}]{problem[0]}"
                raise bad_request(f"'{at}' {problem[1]}", param=at)


def _system(v: Any) -> str | None:
    if isinstance(v, str):
        return None
    if not isinstance(v, list):
        return "expected a string or a list of text blocks"
    for j, block in enumerate(v):
        if problem := _block_error(block, frozenset({"text"})):
            return f"system[{j}]{problem[0]} {problem[1]}"
    return None


def _tools(v: Any) -> str | None:
    if not isinstance(v, list):
        return "expected a list of tools"
    for i, tool in enumerate(v):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not _TOOL_NAME.match(tool["name"]):
            return f"tools[{i}] must be an object with a 'name' (a string without spaces)"
        kind = tool.get("type")
        if kind is None or kind == "custom":  # a client tool; any other type is one of Anthropic's own
            schema = tool.get("input_schema")
            if not isinstance(schema, dict) or schema.get("type", "object") != "object":
                return f"tools[{i}].input_schema must be a JSON Schema object whose type is object"
            if tool.get("description") is not None and not isinstance(tool["description"], str):
                return f"tools[{i}].description must be a string"
        elif not isinstance(kind, str):
            return f"tools[{i}].type must be a string"
        if tool.get("cache_control") is not None and (error := _cache_control(tool["cache_control"])):
            return f"tools[{i}].cache_control {error}"
    return None


def _tool_choice(v: Any) -> str | None:
    if not isinstance(v, dict) or v.get("type") not in ("auto", "any", "tool", "none"):
        return "expected an object whose type is auto, any, tool or none"
    if v["type"] == "tool" and not isinstance(v.get("name"), str):
        return "{type: tool} needs the tool's 'name'"
    if v.get("disable_parallel_tool_use") is not None and not isinstance(v["disable_parallel_tool_use"], bool):
        return "'disable_parallel_tool_use' must be a boolean"
    return None


def _thinking(v: Any) -> str | None:
    if isinstance(v, dict) and v.get("type") == "disabled":
        return None
    if not isinstance(v, dict) or v.get("type") != "enabled":
        return "expected {type: enabled, budget_tokens} or {type: disabled}"
    if not _is_int(v.get("budget_tokens")) or v["budget_tokens"] < MIN_THINKING_BUDGET:
        return f"'budget_tokens' must be an integer of at least {MIN_THINKING_BUDGET}"
    return None


# Every optional request field of the Messages API the gateway serves, with its check. null means absent.
PARAMETERS: dict[str, Check] = {
    "system": _system,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "thinking": _thinking,
    "temperature": _unit_interval,
    "top_p": _unit_interval,
    "top_k": _non_negative_int,
    "stop_sequences": _stop_sequences,
    "metadata": _metadata,
    "service_tier": _service_tier,
}
# count_tokens takes the prompt only (Anthropic's MessageCountTokensParams)
COUNT_PARAMETERS = frozenset({"system", "tools", "tool_choice", "thinking"})
GATEWAY_FIELDS = frozenset({"model", "messages", "max_tokens", "stream"})




def parse_prompt(body: bytes, *, count_only: bool = False) -> tuple[str, bool, dict[str, Any]]:
    """(model, stream, params) of a Messages request body, validated; ``count_only`` for count_tokens, which
    takes the prompt alone (no ``max_tokens``, ``stream`` or sampling parameters)."""
    data, model = request_object(body)
    names = COUNT_PARAMETERS if count_only else PARAMETERS.keys()
    refuse_unknown(data, {"model", "messages", *names} if count_only else {*GATEWAY_FIELDS, *names})
    stream = False
    if not count_only:
        if _positive_int(data.get("max_tokens")):
            raise bad_request("'max_tokens' is required and must be an integer of at least 1", param="max_tokens")
        stream = data.get("stream")
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise bad_request("'stream' must be a boolean", param="stream")
    _check_messages(data.get("messages"))
    params: dict[str, Any] = {"messages": data["messages"]}
    if not count_only:
        params["max_tokens"] = data["max_tokens"]
    for name in names:
        if data.get(name) is not None:
            if error := PARAMETERS[name](data[name]):
                raise bad_request(f"'{name}': {error}", param=name)
            params[name] = data[name]
    choice = params.get("tool_choice")
    if choice is not None and choice["type"] in ("any", "tool") and not params.get("tools"):
        raise bad_request(f"'tool_choice' of type {choice['type']} needs 'tools'", param="tool_choice")
    if choice is not None and choice["type"] == "tool" \
            and not any(t.get("name") == choice["name"] for t in params.get("tools") or ()):
        raise bad_request("'tool_choice.name' must name one of the 'tools'", param="tool_choice.name")
    thinking = params.get("thinking")
    if not count_only and thinking is not None and thinking["type"] == "enabled" \
            and thinking["budget_tokens"] >= params["max_tokens"]:
        raise bad_request("'thinking.budget_tokens' must be less than 'max_tokens'", param="thinking.budget_tokens")
    return model, stream, params


@dataclass
class MessagesRequest:
    """A validated Messages request: the alias, whether to stream, and what goes to the provider (``params``:
    messages, max_tokens and every optional field set, as given)."""

    model: str
    stream: bool
    params: dict[str, Any]
    endpoint: str = "messages"
    limit_keys: tuple[str, ...] = ("max_tokens",)
    _estimates: dict[str, int] = field(default_factory=dict, repr=False)

    def prompt_tokens(self, model: str) -> int:
        """System and messages, as OpenAI-shaped messages (LiteLLM's Anthropic adapter) counted by the gateway's
        bounded estimator; cached per model (a budget reservation and a settlement may both ask)."""
        if model not in self._estimates:
            self._estimates[model] = estimate_anthropic_prompt(model, self.params)
        return self._estimates[model]

    def chat_view(self) -> dict[str, Any]:
        """As an OpenAI chat body, for complexity routing; never raises."""
        try:
            return {"messages": openai_messages(self.params), "tools": self.params.get("tools")}
        except Exception:
            return {"messages": []}


def openai_messages(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The system prompt and messages as OpenAI chat messages, as LiteLLM's Anthropic adapter translates them."""
    from litellm.llms.anthropic.pass_through.adapters.transformation import LiteLLMAnthropicMessagesAdapter

    adapter = LiteLLMAnthropicMessagesAdapter()
    messages: list[Any] = list(adapter.translate_anthropic_messages_to_openai(messages=params["messages"]))
    system = params.get("system")
    if system:
        text = system if isinstance(system, str) else "\n".join(b.get("text", "") for b in system)
        messages.insert(0, {"role": "system", "content": text})
    return [dict(m) for m in messages]


def estimate_anthropic_prompt(model: str, params: dict[str, Any]) -> int:
    """Prompt tokens of a Messages request's system and messages on ``model``; never raises."""
    try:
        return estimate_prompt_tokens(model, openai_messages(params))
    except Exception:  # a shape the adapter cannot translate: a count is not worth a failed request
        log.debug("could not translate the messages for counting; estimating from their JSON", exc_info=True)
        return rough_tokens(len(json.dumps([params.get("system"), params["messages"]], default=str)))


def parse_messages_request(body: bytes) -> MessagesRequest:
    """Parse and validate a ``/v1/messages`` body; raises GatewayError(400) naming the offending field."""
    model, stream, params = parse_prompt(body)
    return MessagesRequest(model=model, stream=stream, params=params)


class MessagesEndpoint:
    """``POST /v1/messages`` in the one pipeline: Anthropic JSON and Anthropic SSE, errors in Anthropic's shape."""

    name = "messages"
    path = "/v1/messages"
    errors = ANTHROPIC_ERRORS
    stream_end = b""  # message_stop is the stream's own last event

    def parse(self, body: bytes) -> MessagesRequest:
        return parse_messages_request(body)

    async def complete(self, deployment: Deployment, request: MessagesRequest,  # type: ignore[override]
                       usage: Usage) -> bytes:
        return await provider.complete(deployment, request.params, usage)

    async def open_stream(self, deployment: Deployment, request: MessagesRequest,  # type: ignore[override]
                          usage: Usage) -> AsyncIterator[bytes]:
        return await provider.open_stream(deployment, request.params, usage)


ENDPOINT = MessagesEndpoint()
