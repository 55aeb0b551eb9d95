"""Anthropic Messages requests to a provider that speaks them, through LiteLLM's Anthropic pass-through
(``litellm.anthropic.messages.acreate``): the request goes up as the client sent it, the answer comes back as
the provider sent it.

The pass-through relays the provider's bytes in whatever pieces they arrive, so the stream is re-framed here
into whole SSE events: the ledger needs the usage of ``message_start`` and ``message_delta``, the stream
guard needs the completion's text as it passes, and an ``error`` event or a stream that ends before
``message_stop`` must fail as a ``GatewayError`` (the listener then ends the client's stream with its own error
event, never a silent cut). Events are relayed as received but for the final ``message_delta``, whose usage
gets the counts only ``message_start`` carried (older API versions, Bedrock), so every client sees all four.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import litellm

from llm_gateway.config import Deployment
from llm_gateway.errors import GatewayError, ProviderOverloaded, from_provider_exception
from llm_gateway.providers.openai_compatible import Usage, malformed, primed
from llm_gateway.providers.upstream import call_args

USAGE_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
TEXT_FIELDS = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}
MIN_THINKING_BUDGET = 1024  # Anthropic's least budget_tokens


class _LiteLLMsOwnCosting(logging.Filter):
    """LiteLLM's pass-through prices every answer for its own (proxy) logging and, for a model its price map
    lacks (a fine-tune, a new model, a self-hosted one), logs an ERROR with a traceback per request. The gateway
    prices answers itself (accounting/prices.py, with the deployment's ``price``): that line is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.endswith("anthropic_passthrough_logging_handler.py")
                    and record.getMessage().startswith("Error creating Anthropic response logging payload"))


logging.getLogger("LiteLLM Proxy").addFilter(_LiteLLMsOwnCosting())


def complete_usage(usage: dict[str, Any] | None, start: dict[str, Any] | None = None) -> dict[str, Any]:
    """An Anthropic usage object with all four counts: what ``usage`` says, else what ``start`` (the stream's
    message_start usage) said, else 0; other fields (service_tier, server_tool_use...) kept."""
    merged: dict[str, Any] = dict(start or {})
    merged.update({k: v for k, v in (usage or {}).items() if v is not None})
    for key in USAGE_KEYS:
        merged.setdefault(key, 0)
    return merged




def stream_error(data: Any) -> GatewayError:
    """The provider's mid-stream ``error`` event as the gateway reports it (its text is not relayed)."""
    kind = (data.get("error") or {}).get("type") if isinstance(data, dict) else None
    if kind == "overloaded_error":
        return ProviderOverloaded(502, "The provider failed to answer.", type="server_error", code="provider_error")
    return GatewayError(502, "The provider reported an error mid-stream.", type="server_error",
                        code="provider_error")


def _thinking_within(params: dict[str, Any]) -> dict[str, Any]:
    """A thinking budget below max_tokens, as Anthropic requires: a consumer's token budget may have lowered
    max_tokens under the budget_tokens the client asked for (validation saw them in order). Lowered only as far
    as Anthropic's minimum; below it the provider's refusal says why."""
    thinking, limit = params.get("thinking"), params.get("max_tokens")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled" or not isinstance(limit, int):
        return params
    budget = thinking.get("budget_tokens")
    if isinstance(budget, int) and budget >= limit > MIN_THINKING_BUDGET:
        return {**params, "thinking": {**thinking, "budget_tokens": limit - 1}}
    return params


async def _call(deployment: Deployment, params: dict[str, Any], stream: bool) -> Any:
    args = call_args(deployment, _thinking_within(params))
    if deployment.drop_params:
        args["drop_params"] = True
    try:
        return await litellm.anthropic.messages.acreate(**args, stream=stream)
    except Exception as exc:
        raise from_provider_exception(exc, params) from exc


def _take_content(usage: Usage, blocks: Any) -> None:
    """A JSON answer's completion text, for estimating its usage when the provider reported none."""
    for block in blocks if isinstance(blocks, list) else ():
        if isinstance(block, dict):
            for key in ("text", "thinking"):
                if isinstance(block.get(key), str):
                    usage.add_text(block[key])
            if block.get("type") == "tool_use":
                usage.add_text(json.dumps(block.get("input"), separators=(",", ":")))


async def complete(deployment: Deployment, params: dict[str, Any], usage: Usage) -> bytes:
    """The provider's ``message`` JSON; every usage count present."""
    result = await _call(deployment, params, stream=False)
    if not isinstance(result, dict) or result.get("type") != "message":
        raise malformed()
    usage.model = result.get("model")
    if isinstance(result.get("stop_reason"), str):
        usage.finish_reasons.append(result["stop_reason"])
    if isinstance(result.get("usage"), dict):
        result["usage"] = complete_usage(result["usage"])
        usage.usage = result["usage"]
    else:
        _take_content(usage, result.get("content"))
    return json.dumps(result, separators=(",", ":")).encode()


async def _frames(stream: Any) -> AsyncIterator[bytes]:
    """Whole SSE events (separator excluded) out of the pass-through's pieces."""
    buffer = b""
    try:
        async for piece in stream:
            buffer += piece if isinstance(piece, bytes) else str(piece).encode()
            buffer = buffer.replace(b"\r\n", b"\n")
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                if frame.strip():
                    yield frame
    except GatewayError:
        raise
    except Exception as exc:  # the connection broke off (httpx's ReadError, LiteLLM's wrappers of it)
        raise from_provider_exception(exc) from exc
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
    if buffer.strip():
        yield buffer


def _data(frame: bytes) -> Any:
    lines = [line[5:].strip() for line in frame.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        raise malformed() from None


async def _events(stream: Any, usage: Usage) -> AsyncGenerator[bytes, None]:
    start: dict[str, Any] = {}
    async for frame in _frames(stream):
        data = _data(frame)
        kind = data.get("type") if isinstance(data, dict) else None
        if data is None:
            continue  # an SSE comment or a keep-alive
        if kind == "error":
            raise stream_error(data)
        if kind == "message_start":
            message = data.get("message") or {}
            usage.model = usage.model or message.get("model")
            start = message.get("usage") or {}
            usage.usage = complete_usage(start)
        elif kind == "content_block_delta":
            delta = data.get("delta") or {}
            text = delta.get(TEXT_FIELDS.get(delta.get("type"), ""))
            if isinstance(text, str):
                usage.add_text(text)
        elif kind == "message_delta":
            counts = usage.usage = complete_usage(data.get("usage"), start)
            stop = (data.get("delta") or {}).get("stop_reason")
            if isinstance(stop, str):
                usage.finish_reasons.append(stop)
            shown = dict(counts)
            if usage.decorate:
                usage.decorate(shown)  # the cost rides in the client's copy only
            data["usage"] = shown
            yield b"event: message_delta\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
            continue
        yield frame + b"\n\n"
        if kind == "message_stop":
            return
    raise GatewayError(502, "The provider's stream ended without completing.", type="server_error",
                       code="provider_error")


async def open_stream(deployment: Deployment, params: dict[str, Any], usage: Usage) -> AsyncIterator[bytes]:
    """The provider's SSE events, whole; the first is read before this returns."""
    stream = await _call(deployment, params, stream=True)
    return await primed(_events(stream, usage))
