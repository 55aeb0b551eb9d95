"""Responses API calls to a deployment: OpenAI's own ``/v1/responses`` for OpenAI deployments, LiteLLM's
chat-completions bridge (``litellm.aresponses``) for the others (Anthropic, the demo provider, ...), which turns
input items into messages, calls ``acompletion`` and builds Response objects and typed stream events from what
comes back.

OpenAI deployments take the lean path, as chat completions do (``openai_compatible``): LiteLLM's OpenAI
Responses config builds the request (its parameter checks, e.g. GPT-5's sampling limits) and the URL, and the
provider's bytes are relayed as received. Through ``litellm.aresponses`` they would be re-encoded from
LiteLLM's models (losing ``logprobs`` and ``obfuscation`` on deltas), wrapped in LiteLLM's base64 routing ids,
and, for any model missing from LiteLLM's price map (fine-tunes, new models, OpenAI-compatible servers), the
stream would be faked: requested whole and replayed at the end (``should_fake_stream``).

Bridged answers get OpenAI's wire format as its published schema has it: LiteLLM's objects are dumped without
their nulls, and what the schema requires is put back (nullable fields, ``logprobs`` on text parts and events,
``name`` on a finished function call, ``strict`` on function tools); LiteLLM's additions
(``provider_specific_fields``, the ``cost`` in usage) are removed and the id is made a plain ``resp_`` id. Their
streams are numbered by what the client was sent and framed as OpenAI frames them (``event: <type>`` +
``data:``, no ``[DONE]``). Either way ``next_sequence`` says what number an error event ending the stream takes.

The gateway is stateless: OpenAI deployments are sent ``store: false``, so the provider keeps nothing the
gateway could not serve back, and responses say ``store: false``.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aiohttp
import litellm
from litellm.llms.openai.responses.transformation import OpenAIResponsesAPIConfig
from litellm.responses.utils import ResponsesAPIRequestUtils
from litellm.types.router import GenericLiteLLMParams

from llm_gateway.config import Deployment
from llm_gateway.errors import GatewayError, from_build_exception, from_provider_exception
from llm_gateway.providers.openai_compatible import Usage, malformed, post, post_for_json, sse_lines
from llm_gateway.providers.upstream import OPENAI_PREFIX, call_args, lean

_OPENAI = OpenAIResponsesAPIConfig()

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


def _refuse_builtin(deployment: Deployment, builtin: tuple[Builtin, ...]) -> None:
    if builtin and not is_native(deployment):
        kinds = ", ".join(sorted({b.kind for b in builtin}))
        raise GatewayError(400, f"Built-in tools and their items ({kinds}) run at OpenAI, and the deployment "
                           f"serving this alias is not an OpenAI one; only function tools work here.",
                           param=builtin[0].param, code="unsupported_parameter")


def _bridge_args(deployment: Deployment, params: dict[str, Any], stream: bool) -> dict[str, Any]:
    """The keyword arguments of ``litellm.aresponses`` for a deployment without a Responses API."""
    if deployment.is_demo:  # the demo provider speaks chat completions: the bridge to it
        model, api_base, api_key = lean(deployment) or ("", None, None)
        args = dict(params, model=OPENAI_PREFIX + model, api_base=api_base, api_key=api_key,
                    timeout=deployment.timeout, max_retries=0, num_retries=0, _skip_mcp_handler=True,
                    use_chat_completions_api=True)
    else:
        args = call_args(deployment, params)
    if deployment.drop_params:
        args["drop_params"] = True
    args["stream"] = stream
    return args


def native_body(model: str, params: dict[str, Any], stream: bool, drop: bool) -> bytes:
    """The request to OpenAI's ``/v1/responses``, as LiteLLM's OpenAI Responses config builds it (``store``
    false: the gateway is stateless). Its parameter checks raise before anything is sent: a 400, not retried."""
    optional = {k: v for k, v in params.items() if k != "input"}
    optional["store"] = False
    if stream:
        optional["stream"] = True
    try:
        mapped = _OPENAI.map_openai_params(optional, model, drop)  # type: ignore[arg-type]
        body = _OPENAI.transform_responses_api_request(model, params["input"], mapped, GenericLiteLLMParams(), {})
    except Exception as exc:
        raise from_build_exception(exc, params) from exc
    return json.dumps(body, separators=(",", ":")).encode()


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




async def _native_complete(deployment: Deployment, params: dict[str, Any], usage: Usage) -> bytes:
    """OpenAI's Response, its bytes as received."""
    model, api_base, api_key = lean(deployment) or ("", None, None)
    body = native_body(model, params, stream=False, drop=deployment.drop_params)
    raw, data = await post_for_json(_OPENAI.get_complete_url(api_base, {}), body, api_key, deployment.timeout)
    if not isinstance(data, dict) or not isinstance(data.get("output"), list):
        raise malformed()
    _take_response(data, usage)
    return raw


def _take_response(data: dict[str, Any], usage: Usage) -> None:
    """What a finished Response says about usage (its text only when it reported no usage)."""
    usage.model = data.get("model") if isinstance(data.get("model"), str) else usage.model
    if isinstance(data.get("status"), str):
        usage.finish_reasons.append(data["status"])
    if isinstance(data.get("usage"), dict):
        usage.usage = data["usage"]
    else:
        _output_text(data, usage)


async def complete(deployment: Deployment, params: dict[str, Any], builtin: tuple[Builtin, ...],
                   usage: Usage) -> bytes:
    """One Response object, as JSON bytes."""
    _refuse_builtin(deployment, builtin)
    if is_native(deployment):
        return await _native_complete(deployment, params, usage)
    try:
        response = await litellm.aresponses(**_bridge_args(deployment, params, stream=False))
    except Exception as exc:
        raise from_provider_exception(exc, params) from exc
    data = response_json(response.model_dump(mode="json", exclude_none=True), params)
    _take_response(data, usage)
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
                _take_terminal(response, self.usage)
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


def _take_terminal(response: dict[str, Any], usage: Usage) -> None:
    """The usage of a stream's last event (the text already passed as deltas); the client's copy of the usage
    gets the cost, as chat streams' usage chunks do."""
    if isinstance(response.get("status"), str):
        usage.finish_reasons.append(response["status"])
    if isinstance(response.get("usage"), dict):
        usage.usage = response["usage"]
        if usage.decorate:
            usage.decorate(response["usage"])


async def _close(stream: Any) -> None:
    """Stop reading from the provider (the bridge's chat stream, or the native HTTP response)."""
    wrapper = getattr(stream, "litellm_custom_stream_wrapper", None)
    closing = getattr(wrapper, "aclose", None) or getattr(getattr(stream, "response", None), "aclose", None)
    if closing is not None:
        try:
            await closing()
        except Exception:  # closing what already broke is no news
            pass


async def _native_events(response: Any, usage: Usage, sequence: list[int]) -> AsyncIterator[bytes]:
    """OpenAI's events, relayed as received (but the last, which gets the cost in its usage); ``sequence`` follows
    the provider's numbering. A stream that breaks off, or ends without its terminal event, raises."""
    async with response:
        try:
            async for line in sse_lines(response.content):
                if not line.startswith(b"data:"):
                    continue  # event: lines (the type is in the data), blank separators, comments
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                try:
                    event = json.loads(payload)
                except ValueError:
                    raise malformed() from None
                if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                    raise malformed()
                kind = event["type"]
                if kind == "error":
                    raise GatewayError(502, "The provider reported an error mid-stream.", type="server_error",
                                       code="provider_error")
                if isinstance(event.get("sequence_number"), int):
                    sequence[0] = event["sequence_number"] + 1
                if kind in DELTA_EVENTS and isinstance(event.get("delta"), str):
                    usage.add_text(event["delta"])
                response_object = event.get("response")
                if isinstance(response_object, dict) and isinstance(response_object.get("model"), str):
                    usage.model = usage.model or response_object["model"]
                if kind in TERMINAL_EVENTS and isinstance(response_object, dict):
                    _take_terminal(response_object, usage)
                    payload = json.dumps(event, separators=(",", ":")).encode()
                yield b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"
                if kind in TERMINAL_EVENTS:
                    return
        except TimeoutError:
            raise GatewayError(504, "The provider stopped sending in time.", type="server_error",
                               code="provider_timeout") from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError):
            raise GatewayError(502, "The provider's stream broke off.", type="server_error",
                               code="provider_error") from None
    raise GatewayError(502, "The provider's stream ended without completing.", type="server_error",
                       code="provider_error")


async def _native_stream(deployment: Deployment, params: dict[str, Any], usage: Usage) -> AsyncIterator[bytes]:
    model, api_base, api_key = lean(deployment) or ("", None, None)
    body = native_body(model, params, stream=True, drop=deployment.drop_params)
    timeout = deployment.timeout
    response = await post(_OPENAI.get_complete_url(api_base, {}), body, api_key,
                           aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout))
    sequence = [0]
    events = _native_events(response, usage, sequence)
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        raise malformed() from None
    except BaseException:
        await events.aclose()
        raise

    async def relay() -> AsyncIterator[bytes]:
        try:
            next_sequence.set(sequence)
            yield first
            while True:
                next_sequence.set(sequence)
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    return
                yield event
        finally:
            await events.aclose()

    return relay()


async def open_stream(deployment: Deployment, params: dict[str, Any], builtin: tuple[Builtin, ...],
                      usage: Usage) -> AsyncIterator[bytes]:
    """SSE events of the Responses API. The first is read before this returns, so a provider failing before
    its first byte fails here, while the gateway can still answer with a status code."""
    _refuse_builtin(deployment, builtin)
    if is_native(deployment):
        return await _native_stream(deployment, params, usage)
    try:
        stream = await litellm.aresponses(**_bridge_args(deployment, params, stream=True))
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
