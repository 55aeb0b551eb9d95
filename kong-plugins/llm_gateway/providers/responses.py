"""Responses API calls through LiteLLM (``litellm.aresponses``): OpenAI deployments get the provider's own
``/v1/responses``; the others (Anthropic, the demo provider, ...) go through LiteLLM's chat-completions bridge,
which turns input items into messages, calls ``acompletion`` and builds Response objects and typed stream
events from what comes back.

Either way the client gets OpenAI's wire format, as its published schema has it: LiteLLM's objects are dumped
without their nulls, and what the schema requires is put back (nullable fields, ``logprobs`` on text parts and
events, ``name`` on a finished function call); LiteLLM's own additions (``provider_specific_fields``, the
``cost`` in usage) are removed, and the id is the provider's (LiteLLM wraps it in a base64 routing id that
only its proxy can use). Streams are renumbered (``sequence_number`` counts what the client was sent, so an
error event that ends a stream continues the count) and framed as OpenAI frames them
(``event: <type>`` + ``data:``, no ``[DONE]``).

The gateway is stateless: OpenAI deployments are sent ``store: false``, so the provider keeps nothing the
gateway could not serve back, and responses say ``store: false``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import litellm
from litellm.responses.utils import ResponsesAPIRequestUtils

from llm_gateway.config import Deployment
from llm_gateway.errors import GatewayError, from_provider_exception
from llm_gateway.providers.openai_compatible import Usage
from llm_gateway.providers.upstream import OPENAI_PREFIX, call_args, lean

# the sequence number the next event of this request's stream carries; each request is its own task (its own
# context), and the stream re-sets it each time it is resumed, in the task that relays it
next_sequence: ContextVar[list[int] | None] = ContextVar("responses_next_sequence", default=None)

# what a Response echoes of its request, when LiteLLM's bridge left it out
ECHOED = ("instructions", "max_output_tokens", "temperature", "top_p", "parallel_tool_calls", "tool_choice",
          "tools", "text", "metadata", "reasoning", "user")
REQUIRED_NULLABLE = ("error", "incomplete_details", "instructions", "max_output_tokens", "previous_response_id",
                     "temperature", "top_p")
TEXT_EVENTS = frozenset({"response.output_text.delta", "response.output_text.done"})
DELTA_EVENTS = frozenset({"response.output_text.delta", "response.function_call_arguments.delta",
                          "response.refusal.delta"})
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_ID_CHARS = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class Builtin:
    """A built-in tool, or an input item of one, that only an OpenAI deployment can honour."""

    param: str  # e.g. "tools[0]" or "input[3]"
    kind: str  # its type, e.g. "web_search"


def is_native(deployment: Deployment) -> bool:
    """Whether the deployment has a Responses API of its own (LiteLLM forwards to it) rather than the bridge."""
    return deployment.model.startswith(OPENAI_PREFIX)


def _args(deployment: Deployment, params: dict[str, Any], builtin: tuple[Builtin, ...],
          stream: bool) -> dict[str, Any]:
    """The keyword arguments of ``litellm.aresponses`` for this deployment."""
    native = is_native(deployment)
    if builtin and not native:
        kinds = ", ".join(sorted({b.kind for b in builtin}))
        raise GatewayError(400, f"Built-in tools and their items ({kinds}) run at OpenAI, and the deployment "
                           f"serving this alias is not an OpenAI one; only function tools work here.",
                           param=builtin[0].param, code="unsupported_parameter")
    if deployment.is_demo:  # the demo provider speaks chat completions: LiteLLM's bridge to it
        model, api_base, api_key = lean(deployment) or ("", None, None)
        args = dict(params, model=OPENAI_PREFIX + model, api_base=api_base, api_key=api_key,
                    timeout=deployment.timeout, max_retries=0, num_retries=0, _skip_mcp_handler=True,
                    use_chat_completions_api=True)
    else:
        args = call_args(deployment, params)
    if native:
        args["store"] = False
    if deployment.drop_params:
        args["drop_params"] = True
    args["stream"] = stream
    return args


def client_id(value: Any) -> str:
    """The response id the client sees: the provider's own (``resp_...``), not LiteLLM's base64 routing id."""
    if not isinstance(value, str) or not value:
        return "resp_" + uuid.uuid4().hex
    inner = ResponsesAPIRequestUtils.decode_responses_api_response_id(value).get("response_id") or value
    if inner.startswith("resp_"):
        return inner
    return "resp_" + _ID_CHARS.sub("", inner.removeprefix("chatcmpl-"))[:64]  # the bridge's chat completion id


def _part(part: Any) -> None:
    if isinstance(part, dict) and part.get("type") == "output_text":
        part.setdefault("annotations", [])
        part.setdefault("logprobs", [])


def _item(item: Any) -> None:
    if not isinstance(item, dict):
        return
    item.pop("provider_specific_fields", None)
    if item.get("type") == "message":
        for part in item.get("content") or ():
            _part(part)


def _tool(tool: Any) -> Any:
    """A tool as a Response echoes it: a function tool's nullable ``strict`` and ``parameters`` present (a copy:
    the request's own tools are left as they were sent)."""
    if isinstance(tool, dict) and tool.get("type") == "function":
        return {"strict": None, "parameters": None, **tool}
    return tool


def response_json(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A Response object as OpenAI's schema has it (see the module docstring)."""
    data.pop("provider_specific_fields", None)
    data["id"] = client_id(data.get("id"))
    data["object"] = "response"
    data["store"] = False
    for key in ECHOED:
        if data.get(key) in (None, {}, []) and params.get(key) not in (None, {}, []):
            data[key] = params[key]
    for key in REQUIRED_NULLABLE:
        data.setdefault(key, None)
    data.setdefault("metadata", {})
    data["tools"] = [_tool(t) for t in data.get("tools") or ()]
    data.setdefault("tool_choice", "auto")
    data.setdefault("parallel_tool_calls", True)
    data.setdefault("output", [])
    if not data.get("text"):
        data["text"] = {"format": {"type": "text"}}
    for item in data["output"]:
        _item(item)
    usage = data.get("usage")
    if isinstance(usage, dict):
        usage.pop("cost", None)
        inputs = usage.setdefault("input_tokens_details", {})
        if isinstance(inputs, dict):
            inputs.setdefault("cached_tokens", 0)
            inputs.setdefault("cache_write_tokens", 0)
        outputs = usage.setdefault("output_tokens_details", {})
        if isinstance(outputs, dict):
            outputs.setdefault("reasoning_tokens", 0)
    return data


def _output_text(data: dict[str, Any], usage: Usage) -> None:
    """The completion's text into ``usage`` (for an estimate, when the provider reported no usage)."""
    for item in data.get("output") or ():
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("arguments"), str):
            usage.add_text(item["arguments"])
        for part in item.get("content") or ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                usage.add_text(part["text"])


async def complete(deployment: Deployment, params: dict[str, Any], builtin: tuple[Builtin, ...],
                   usage: Usage) -> bytes:
    """One Response object, as JSON bytes."""
    args = _args(deployment, params, builtin, stream=False)
    try:
        response = await litellm.aresponses(**args)
    except Exception as exc:
        raise from_provider_exception(exc, params) from exc
    data = response_json(response.model_dump(mode="json", exclude_none=True), params)
    usage.model, usage.usage = data.get("model"), data.get("usage")
    if isinstance(data.get("status"), str):
        usage.finish_reasons.append(data["status"])
    if not usage.usage:
        _output_text(data, usage)
    return json.dumps(data, separators=(",", ":")).encode()


class _Relay:
    """What one stream's events need from each other: the count, and the names of function calls by item."""

    def __init__(self, params: dict[str, Any], usage: Usage) -> None:
        self.params, self.usage = params, usage
        self.sequence = [0]
        self.names: dict[str, str] = {}

    def event(self, event: Any) -> bytes:
        """One LiteLLM event as the SSE event the client gets; usage and text are taken as it passes."""
        data = event.model_dump(mode="json", exclude_none=True)
        kind = data.get("type")
        response = data.get("response")
        if isinstance(response, dict):
            response_json(response, self.params)
            self.usage.model = self.usage.model or response.get("model")
            if kind in TERMINAL_EVENTS:
                if isinstance(response.get("status"), str):
                    self.usage.finish_reasons.append(response["status"])
                if isinstance(response.get("usage"), dict):
                    self.usage.usage = response["usage"]
                    if self.usage.decorate:
                        self.usage.decorate(response["usage"])
        if kind in DELTA_EVENTS and isinstance(data.get("delta"), str):
            self.usage.add_text(data["delta"])
        if kind in TEXT_EVENTS:
            data.setdefault("logprobs", [])
        item = data.get("item")
        if isinstance(item, dict):
            _item(item)
            if item.get("type") == "function_call" and isinstance(item.get("id"), str):
                self.names[item["id"]] = str(item.get("name", ""))
        _part(data.get("part"))
        if kind == "response.function_call_arguments.done":
            data.setdefault("name", self.names.get(str(data.get("item_id")), ""))
        data["sequence_number"] = self.sequence[0]
        self.sequence[0] += 1
        return (b"event: " + str(kind).encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode()
                + b"\n\n")


async def _close(stream: Any) -> None:
    """Stop reading from the provider (the bridge's chat stream, or the native HTTP response)."""
    wrapper = getattr(stream, "litellm_custom_stream_wrapper", None)
    closing = getattr(wrapper, "aclose", None) or getattr(getattr(stream, "response", None), "aclose", None)
    if closing is not None:
        try:
            await closing()
        except Exception:  # closing what already broke is no news
            pass


async def open_stream(deployment: Deployment, params: dict[str, Any], builtin: tuple[Builtin, ...],
                      usage: Usage) -> AsyncIterator[bytes]:
    """SSE events of the Responses API. The first is read before this returns, so a provider failing before
    its first byte fails here, while the gateway can still answer with a status code."""
    args = _args(deployment, params, builtin, stream=True)
    try:
        stream = await litellm.aresponses(**args)
        iterator = stream.__aiter__()
        first = await iterator.__anext__()
    except StopAsyncIteration:
        raise GatewayError(502, "The provider's stream ended before it began.", type="server_error",
                           code="provider_error") from None
    except Exception as exc:
        raise from_provider_exception(exc, params) from exc
    relay = _Relay(params, usage)
    head = relay.event(first)

    async def events() -> AsyncIterator[bytes]:
        try:
            next_sequence.set(relay.sequence)
            yield head
            while True:
                next_sequence.set(relay.sequence)
                try:
                    event = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    raise from_provider_exception(exc) from exc
                yield relay.event(event)
        finally:
            await _close(stream)

    return events()
