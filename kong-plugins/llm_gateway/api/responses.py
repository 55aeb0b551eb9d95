"""``POST /v1/responses``: OpenAI's Responses API, validated here so bad input gets a precise 400 (``param``
naming the field) before any provider call, and answered through ``providers.responses`` (LiteLLM).

The checks follow OpenAI's ``CreateResponse`` (its published OpenAPI schema) for what the gateway serves:
``input`` as a string or a list of items (messages with input_text / input_image / input_file parts,
function_call, function_call_output, reasoning), ``instructions``, function ``tools`` and ``tool_choice``,
``text.format`` (structured output), sampling and limits, ``reasoning``, ``metadata``, ``user``, ``stream``.

The gateway is stateless, so what needs state kept between requests is refused by name, never ignored:
``previous_response_id``, ``store: true``, ``conversation``, ``background: true``, stored ``prompt`` templates,
``item_reference`` input items. A response lives only in the client's hands: the client sends the whole
conversation each turn (``store: false`` is what OpenAI calls this mode), and the gateway sends ``store: false``
upstream so the provider keeps nothing either. Built-in tools (web_search, file_search, computer, ...) and
their call items run at OpenAI, so they pass only to OpenAI deployments: ``builtin`` lists them and the
provider call refuses them elsewhere. Unknown fields are refused by name.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_gateway.accounting.tokens import estimate_prompt_tokens
from llm_gateway.api.chat_completions import (
    _FUNCTION_NAME,
    Check,
    _boolean,
    _dict,
    _int_range,
    _metadata,
    _one_of,
    _range,
    _string,
)
from llm_gateway.api.request_body import refuse_unknown, request_object
from llm_gateway.errors import GatewayError, bad_request
from llm_gateway.providers import responses as provider
from llm_gateway.providers.responses import Builtin, next_sequence

if TYPE_CHECKING:
    from llm_gateway.config import Deployment
    from llm_gateway.providers.openai_compatible import Usage

ROLES = frozenset({"user", "assistant", "system", "developer"})
INPUT_PARTS = frozenset({"input_text", "input_image", "input_file"})
ASSISTANT_PARTS = frozenset({"output_text", "refusal", "input_text"})
IMAGE_DETAILS = (None, "auto", "low", "high", "original")
# the tools OpenAI runs itself (the spec's Tool union but function): only an OpenAI deployment can honour them
BUILTIN_TOOLS = frozenset({
    "file_search", "computer", "computer_use", "computer_use_preview", "web_search", "web_search_preview",
    "web_search_preview_2025_03_11", "web_search_2025_08_26", "mcp", "code_interpreter", "image_generation",
    "local_shell", "shell", "custom", "namespace", "tool_search", "apply_patch", "programmatic_tool_calling",
})
# the input items of built-in tools (the spec's Item union): their calls ran at OpenAI, so they go back there
BUILTIN_ITEMS = frozenset({
    "file_search_call", "computer_call", "computer_call_output", "web_search_call", "image_generation_call",
    "code_interpreter_call", "local_shell_call", "local_shell_call_output", "shell_call", "shell_call_output",
    "apply_patch_call", "apply_patch_call_output", "mcp_list_tools", "mcp_approval_request",
    "mcp_approval_response", "mcp_call", "custom_tool_call", "custom_tool_call_output", "tool_search_call",
    "tool_search_output", "additional_tools", "compaction", "compaction_trigger", "program", "program_output",
})
INCLUDABLE = frozenset({
    "web_search_call.action.sources", "web_search_call.results", "code_interpreter_call.outputs",
    "computer_call_output.output.image_url", "file_search_call.results", "message.input_image.image_url",
    "message.output_text.logprobs", "reasoning.encrypted_content",
})
# fields whose only meaning is state the gateway would have to keep: (when refused, why)
STATEFUL = {
    "previous_response_id": (lambda v: v is not None, "it refers to a response stored by the server"),
    "conversation": (lambda v: v is not None, "it refers to a conversation stored by the server"),
    "store": (lambda v: v is True, "it asks the server to keep the response"),
    "background": (lambda v: v is True, "a background response must be stored to be retrieved later"),
    "prompt": (lambda v: v is not None, "it refers to a prompt template stored at OpenAI"),
}
# fields OpenAI defines that the gateway does not serve (refused by name when set, like unknown ones)
UNSERVED = frozenset({"context_management", "moderation", "stream_options"})


def _max_output_tokens(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 16 else "expected an integer of at least 16"


def _include(v: Any) -> str | None:
    if isinstance(v, list) and all(isinstance(x, str) and x in INCLUDABLE for x in v):
        return None
    return f"expected a list of: {', '.join(sorted(INCLUDABLE))}"


def _reasoning(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "expected an object like {effort: low}"
    if v.get("effort") not in (None, "none", "minimal", "low", "medium", "high", "xhigh"):
        return "'effort' must be one of none, minimal, low, medium, high, xhigh"
    for key in ("summary", "generate_summary"):
        if v.get(key) not in (None, "auto", "concise", "detailed"):
            return f"'{key}' must be one of auto, concise, detailed"
    unknown = sorted(set(v) - {"effort", "summary", "generate_summary", "mode"})
    return f"unknown field '{unknown[0][:64]}'" if unknown else None


def _text(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "expected an object like {format: {type: json_schema, ...}}"
    if v.get("verbosity") not in (None, "low", "medium", "high"):
        return "'verbosity' must be one of low, medium, high"
    fmt = v.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        return "'format' must be an object whose type is one of text, json_object, json_schema"
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            return "a json_schema format needs a 'name'"
        if not isinstance(fmt.get("schema"), dict):
            return "a json_schema format needs a 'schema' object"
        if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
            return "'format.strict' must be a boolean"
        if fmt.get("description") is not None and not isinstance(fmt["description"], str):
            return "'format.description' must be a string"
    return None


def _tool_choice(v: Any) -> str | None:
    if v in ("none", "auto", "required"):
        return None
    if isinstance(v, dict) and isinstance(v.get("type"), str):
        kind = v["type"]
        if kind in ("function", "custom"):
            return None if isinstance(v.get("name"), str) else f"a {kind} tool_choice needs a 'name'"
        if kind == "allowed_tools":
            if v.get("mode") in ("auto", "required") and isinstance(v.get("tools"), list):
                return None
            return "allowed_tools needs 'mode' (auto or required) and a 'tools' list"
        if kind in BUILTIN_TOOLS or kind.startswith("web_search"):
            return None
    return "expected none, auto, required or an object like {type: function, name: ...}"


PARAMETERS: dict[str, Check] = {
    "instructions": _string,
    "max_output_tokens": _max_output_tokens,
    "temperature": _range(0, 2),
    "top_p": _range(0, 1),
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _boolean,
    "text": _text,
    "reasoning": _reasoning,
    "metadata": _metadata,
    "user": _string,
    "include": _include,
    "safety_identifier": _string,
    "prompt_cache_key": _string,
    "prompt_cache_retention": _one_of("in_memory", "24h"),
    "prompt_cache_options": _dict,
    "service_tier": _one_of("auto", "default", "flex", "scale", "priority"),
    "truncation": _one_of("auto", "disabled"),
    "top_logprobs": _int_range(0, 20),
    "max_tool_calls": _int_range(1, 2 ** 31 - 1),
}
GATEWAY_FIELDS = frozenset({"model", "input", "stream", "tools"})


@dataclass
class ResponsesRequest:
    """A validated ``/v1/responses`` request (an ``api.base.ApiRequest``)."""

    model: str
    stream: bool
    params: dict[str, Any]  # input and the parameters set (not null), as given
    builtin: tuple[Builtin, ...] = ()
    endpoint: str = "responses"
    limit_keys: tuple[str, ...] = ("max_output_tokens",)
    _prompt_tokens: dict[str, int] = field(default_factory=dict, repr=False)

    def prompt_tokens(self, model: str) -> int:
        """Instructions and input as the chat messages LiteLLM counts (cached per model: budgets and usage ask)."""
        if model not in self._prompt_tokens:
            self._prompt_tokens[model] = estimate_prompt_tokens(model, as_messages(self.params))
        return self._prompt_tokens[model]

    def chat_view(self) -> dict[str, Any]:
        """As an OpenAI chat body, for complexity routing; never raises."""
        try:
            return {"messages": as_messages(self.params), "tools": self.params.get("tools")}
        except Exception:
            return {"messages": []}


def _part_text(part: dict[str, Any]) -> dict[str, Any]:
    if part.get("type") == "input_image":
        return {"type": "image_url", "image_url": {"url": ""}}
    text = part.get("text") if isinstance(part.get("text"), str) else part.get("refusal")
    return {"type": "text", "text": text if isinstance(text, str) else ""}


def as_messages(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Instructions and input as chat messages, for token estimates only (images count as images)."""
    messages: list[dict[str, Any]] = []
    if isinstance(params.get("instructions"), str):
        messages.append({"role": "system", "content": params["instructions"]})
    value = params.get("input")
    if isinstance(value, str):
        return [*messages, {"role": "user", "content": value}]
    for item in value if isinstance(value, list) else ():
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = [_part_text(p) for p in content if isinstance(p, dict)]
            messages.append({"role": item.get("role", "user"), "content": content})
        elif kind == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": item.get("call_id"), "type": "function",
                 "function": {"name": item.get("name"), "arguments": item.get("arguments")}}]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = [_part_text(p) for p in output if isinstance(p, dict)]
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
    return messages


def _check_part(part: Any, allowed: frozenset[str], at: str) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str) or part.get("type") not in allowed:
        raise bad_request(f"'{at}' must be a content part whose type is one of {', '.join(sorted(allowed))}",
                          param=f"{at}.type" if isinstance(part, dict) else at)
    kind = part["type"]
    if kind in ("input_text", "output_text") and not isinstance(part.get("text"), str):
        raise bad_request(f"'{at}.text' must be a string", param=f"{at}.text")
    if kind == "refusal" and not isinstance(part.get("refusal"), str):
        raise bad_request(f"'{at}.refusal' must be a string", param=f"{at}.refusal")
    if kind == "input_image":
        if not isinstance(part.get("image_url"), str) and not isinstance(part.get("file_id"), str):
            raise bad_request(f"'{at}' needs an 'image_url' (a URL or a data URL) or a 'file_id'",
                              param=f"{at}.image_url")
        if part.get("detail") is not None and (not isinstance(part.get("detail"), str)
                                               or part.get("detail") not in IMAGE_DETAILS):
            raise bad_request(f"'{at}.detail' must be one of auto, low, high, original", param=f"{at}.detail")
    if kind == "input_file" and not any(isinstance(part.get(k), str)
                                        for k in ("file_data", "file_url", "file_id")):
        raise bad_request(f"'{at}' needs 'file_data', 'file_url' or 'file_id'", param=at)


def _check_message(item: dict[str, Any], at: str) -> None:
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise bad_request(f"'{at}.role' must be one of {', '.join(sorted(ROLES))}", param=f"{at}.role")
    content = item.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise bad_request(f"'{at}.content' must be a string or a list of content parts", param=f"{at}.content")
    allowed = ASSISTANT_PARTS if role == "assistant" else INPUT_PARTS
    for j, part in enumerate(content):
        _check_part(part, allowed, f"{at}.content[{j}]")


def _strings(item: dict[str, Any], at: str, *names: str) -> None:
    for name in names:
        if not isinstance(item.get(name), str):
            raise bad_request(f"'{at}.{name}' must be a string", param=f"{at}.{name}")


def _check_item(item: Any, at: str, builtin: list[Builtin]) -> None:
    if not isinstance(item, dict):
        raise bad_request(f"'{at}' must be an input item object", param=at)
    kind = item.get("type", "message")
    if kind == "message":
        _check_message(item, at)
    elif kind == "function_call":
        _strings(item, at, "call_id", "name", "arguments")
    elif kind == "function_call_output":
        _strings(item, at, "call_id")
        output = item.get("output")
        if isinstance(output, list):
            for j, part in enumerate(output):
                _check_part(part, INPUT_PARTS, f"{at}.output[{j}]")
        elif not isinstance(output, str):
            raise bad_request(f"'{at}.output' must be a string or a list of content parts", param=f"{at}.output")
    elif kind == "reasoning":
        if not isinstance(item.get("summary"), list):
            raise bad_request(f"'{at}.summary' must be a list", param=f"{at}.summary")
    elif kind == "item_reference":
        raise bad_request(f"'{at}' is an item_reference, which this gateway cannot serve: it is stateless and "
                          f"keeps no items. Send the item itself.", param=at, code="unsupported_parameter")
    elif isinstance(kind, str) and kind in BUILTIN_ITEMS:
        builtin.append(Builtin(at, kind))
    else:
        raise bad_request(f"'{at}.type' is not an input item type this gateway serves (message, function_call, "
                          f"function_call_output, reasoning, or an item of a built-in tool)", param=f"{at}.type")


def _check_input(value: Any, builtin: list[Builtin]) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty list of input items", param="input")
    for i, item in enumerate(value):
        _check_item(item, f"input[{i}]", builtin)


def _check_tools(value: Any, builtin: list[Builtin]) -> None:
    if not isinstance(value, list):
        raise bad_request("'tools' must be a list of tools", param="tools")
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            if not isinstance(tool.get("name"), str) or not _FUNCTION_NAME.match(tool["name"]):
                raise bad_request(f"'{at}.name' is required (a string without spaces)", param=f"{at}.name")
            if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
                raise bad_request(f"'{at}.parameters' must be a JSON Schema object", param=f"{at}.parameters")
            if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
                raise bad_request(f"'{at}.strict' must be a boolean", param=f"{at}.strict")
            if tool.get("description") is not None and not isinstance(tool["description"], str):
                raise bad_request(f"'{at}.description' must be a string", param=f"{at}.description")
        elif isinstance(kind, str) and kind in BUILTIN_TOOLS:
            builtin.append(Builtin(at, kind))
        else:
            raise bad_request(f"'{at}.type' must be function or a built-in tool type", param=f"{at}.type")


def parse_responses_request(body: bytes) -> ResponsesRequest:
    """Parse and validate a request body; raises GatewayError(400) naming the offending field."""
    data, model = request_object(body)
    for name, (refused, why) in STATEFUL.items():
        if name in data and refused(data[name]):
            raise GatewayError(400, f"'{name}' is not supported: {why}, and this gateway is stateless. Send the "
                               f"whole conversation in 'input' instead (and leave 'store' unset or false).",
                               param=name, code="unsupported_parameter")
    for name in sorted(UNSERVED):
        if data.get(name) is not None:
            raise GatewayError(400, f"'{name}' is not supported by this gateway.", param=name,
                               code="unsupported_parameter")
    refuse_unknown(data, PARAMETERS.keys() | GATEWAY_FIELDS | STATEFUL.keys() | UNSERVED)
    if "input" not in data or data["input"] is None:
        raise bad_request("'input' is required: a string or a list of input items", param="input")
    builtin: list[Builtin] = []
    _check_input(data["input"], builtin)
    stream = data.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    params: dict[str, Any] = {"input": data["input"]}
    if data.get("tools") is not None:
        _check_tools(data["tools"], builtin)
        params["tools"] = data["tools"]
    for name, check in PARAMETERS.items():
        if name in data and data[name] is not None:
            if error := check(data[name]):
                raise bad_request(f"'{name}': {error}", param=name)
            params[name] = data[name]
    if "tool_choice" in params and params["tool_choice"] != "none" and not params.get("tools"):
        raise bad_request("'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
    return ResponsesRequest(model=model, stream=stream, params=params, builtin=tuple(builtin))


# -- errors -----------------------------------------------------------------------------------------------------

class ResponsesErrors:
    """OpenAI's ``{"error": {...}}`` body; a stream that fails after it began ends with the Responses API's own
    ``event: error`` (``{"type": "error", "code", "message", "param", "sequence_number"}``), which the OpenAI
    SDKs deliver as a ``ResponseErrorEvent``."""

    def body(self, err: GatewayError) -> str:
        return err.json()

    def stream_event(self, err: GatewayError) -> bytes:
        counter = next_sequence.get()
        event = {"type": "error", "code": err.code, "message": err.message, "param": err.param,
                 "sequence_number": counter[0] if counter else 0}
        return b"event: error\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


RESPONSES_ERRORS = ResponsesErrors()


class ResponsesEndpoint:
    """``POST /v1/responses`` for the one pipeline (an ``api.base.Endpoint``)."""

    name = "responses"
    path = "/v1/responses"
    errors = RESPONSES_ERRORS
    stream_end = b""  # a Responses stream ends with its response.completed event: no [DONE]

    def parse(self, body: bytes) -> ResponsesRequest:
        return parse_responses_request(body)

    async def complete(self, deployment: Deployment, request: ResponsesRequest, usage: Usage) -> bytes:
        return await provider.complete(deployment, request.params, request.builtin, usage)

    async def open_stream(self, deployment: Deployment, request: ResponsesRequest,
                          usage: Usage) -> AsyncIterator[bytes]:
        return await provider.open_stream(deployment, request.params, request.builtin, usage)


ENDPOINT = ResponsesEndpoint()
