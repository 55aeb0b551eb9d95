"""The lean path for providers that already speak OpenAI's wire format (OpenAI itself, the demo provider).

``litellm.acompletion`` costs 5–9 ms of CPU per call and ~0.8 ms per streamed chunk, whatever the knobs
(research notes; bench/). For a provider that speaks OpenAI's format there is nothing to translate, so this
path keeps what LiteLLM knows — which parameters the model supports and how to map them (o-series, GPT-5,
unknown models: ``parameter_policy.for_openai_format``), the request body, the URL — by calling the provider
config's pure functions once per request, and does the HTTP itself: one pooled aiohttp session, the
provider's bytes relayed as they come.
Every chunk is still parsed (about a µs with orjson: wire_json.py), to find usage and to catch a malformed
stream, and forwarded as received, except that the ``usage: null`` a provider adds to every chunk when usage
is asked for upstream (the gateway always asks: accounting) is taken out again when the client did not ask.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from llm_gateway import wire_json
from llm_gateway.errors import GatewayError, from_provider_status
from llm_gateway.providers import parameter_policy

TEXT_KEPT_CHARS = 64 * 1024  # completion text kept for estimating usage; beyond it only its length counts
_session: aiohttp.ClientSession | None = None


@dataclass
class Usage:
    """What the provider reported, filled while the response passes through: its usage when it reports one,
    and the completion text, from which usage is estimated when it does not (or when the client left)."""

    model: str | None = None
    usage: dict[str, Any] | None = None
    text: list[str] = field(default_factory=list)  # the first TEXT_KEPT_CHARS of it: memory stays bounded
    decorate: Callable[[dict[str, Any]], None] | None = None  # adds e.g. the cost to a usage sent to the client
    dropped: list[str] = field(default_factory=list)  # parameters the serving deployment dropped (drop_params)
    chars: int = 0  # length of all completion text seen, kept or not
    kept: int = 0  # length of what ``text`` holds

    def add_text(self, piece: str) -> None:
        """Completion text as it passes (any endpoint): counted whole, kept up to TEXT_KEPT_CHARS."""
        self.chars += len(piece)
        if self.kept < TEXT_KEPT_CHARS:
            piece = piece[:TEXT_KEPT_CHARS - self.kept]
            self.text.append(piece)
            self.kept += len(piece)
            if len(self.text) >= 512:  # thousands of tiny strings cost more than their characters
                self.text[:] = ["".join(self.text)]
    finish_reasons: list[str] = field(default_factory=list)  # as the provider gave them (traces)

    def take_finish_reasons(self, choices: Any) -> None:
        """Only the finish reasons, for an answer whose usage was reported (its text is not needed)."""
        for choice in choices or ():
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                self.finish_reasons.append(choice["finish_reason"])

    def take_text(self, choices: Any) -> None:
        for choice in choices or ():
            part = (choice.get("delta") or choice.get("message") or {}) if isinstance(choice, dict) else {}
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                self.finish_reasons.append(choice["finish_reason"])
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("content"), str):
                self.add_text(part["content"])
            calls = part.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                arguments = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(arguments, str):
                    self.add_text(arguments)


def session() -> aiohttp.ClientSession:
    """One connection pool for all provider calls of this process (created on the running loop). It keeps no
    cookies: the session is every consumer's, so a cookie a provider (or the CDN in front of it) sets on one
    consumer's answer must not ride along on the next consumer's request; nor is a jar to filter per request."""
    global _session
    if _session is None or _session.closed:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True, json_serialize=json.dumps)
    return _session


def request_body(model: str, params: dict[str, Any], stream: bool, *, drop: bool = False,
                 usage: Usage | None = None) -> bytes:
    """The provider's request body, as LiteLLM's OpenAI config builds it under the gateway's parameter policy."""
    prepared = parameter_policy.for_openai_format(model, params, drop, stream=stream)
    if usage is not None:
        usage.dropped = prepared.dropped
    assert prepared.body is not None
    return wire_json.dumps(prepared.body)


def url_of(model: str, api_base: str | None) -> str:
    return parameter_policy.openai_config(model).get_complete_url(api_base, None, model, {}, {})


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def post(url: str, body: bytes, api_key: str | None, limits: aiohttp.ClientTimeout) -> Any:
    """POST a JSON body to an OpenAI-format provider: its 200 response (to be read), or the GatewayError its
    failure maps to (504 on timeout, 502 unreachable, the provider's status through ``from_provider_status``)."""
    try:
        response = await session().post(url, data=body, headers=_headers(api_key), timeout=limits)
    except TimeoutError:
        raise GatewayError(504, "The provider did not answer in time.", type="server_error",
                           code="provider_timeout") from None
    except aiohttp.ClientError:
        raise GatewayError(502, "The provider could not be reached.", type="server_error",
                           code="provider_error") from None
    if response.status != 200:
        async with response:
            try:
                error_body = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                error_body = b""
        raise from_provider_status(response.status, error_body, response.headers)
    return response


def malformed() -> GatewayError:
    return GatewayError(502, "The provider sent a malformed response.", type="server_error",
                        code="provider_error")


async def post_for_json(url: str, body: bytes, api_key: str | None, timeout_s: float,
                        parse_constant: Callable[[str], Any] | None = None) -> tuple[bytes, Any]:
    """A whole JSON answer: the provider's bytes as received, and what they parse to (502 if they do not)."""
    response = await post(url, body, api_key, aiohttp.ClientTimeout(total=timeout_s))
    async with response:
        try:
            raw = await response.read()
        except TimeoutError:
            raise GatewayError(504, "The provider did not answer in time.", type="server_error",
                               code="provider_timeout") from None
        except aiohttp.ClientError:
            raise malformed() from None
    try:
        return raw, wire_json.loads(raw, parse_constant)
    except (ValueError, RecursionError):
        raise malformed() from None


async def complete(model: str, api_base: str | None, api_key: str | None, params: dict[str, Any],
                   timeout_s: float, usage: Usage, *, drop: bool = False) -> bytes:
    """A chat.completion, as the provider's own JSON bytes."""
    body = request_body(model, params, stream=False, drop=drop, usage=usage)
    raw, data = await post_for_json(url_of(model, api_base), body, api_key, timeout_s)
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise malformed()
    usage.model, usage.usage = data.get("model"), data.get("usage")
    if not usage.usage:
        usage.take_text(data["choices"])
    else:
        usage.take_finish_reasons(data["choices"])
    return raw


async def open_stream(model: str, api_base: str | None, api_key: str | None, params: dict[str, Any],
                      timeout_s: float, include_usage: bool, usage: Usage, *,
                      drop: bool = False) -> AsyncIterator[bytes]:
    """SSE events (``data: …\\n\\n``) ready for the client, ``[DONE]`` excluded.

    The first event is read before this returns, so a provider failing before its first byte still gets a
    proper status code. A stream that ends without ``[DONE]`` raises GatewayError: the listener then ends
    the client's stream with an explicit error event.
    """
    body = request_body(model, params, stream=True, drop=drop, usage=usage)
    response = await post(url_of(model, api_base), body, api_key,
                           aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s))
    return await primed(_events(response, include_usage, usage))


async def primed(events: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """``events`` with its first event already read: a provider that fails (or sends nothing) before its first
    event fails here, while the gateway can still answer with a status code (and the router retry it)."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        raise malformed() from None
    except BaseException:
        await events.aclose()
        raise

    async def relay() -> AsyncIterator[bytes]:
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return relay()


async def sse_lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Lines of any length (aiohttp's own line iterator refuses lines over 128 KiB: a large tool call)."""
    buffer = b""
    async for data in content.iter_any():
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line
    if buffer:
        yield buffer


async def _events(response: Any, include_usage: bool, usage: Usage) -> AsyncGenerator[bytes, None]:
    async with response:
        try:
            async for line in sse_lines(response.content):
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event: lines
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                try:
                    chunk = wire_json.loads(payload)
                except (ValueError, RecursionError):
                    raise malformed() from None
                if not isinstance(chunk, dict):
                    raise malformed()
                if chunk.get("error"):
                    raise GatewayError(502, "The provider reported an error mid-stream.", type="server_error",
                                       code="provider_error")
                usage.model = usage.model or chunk.get("model")
                usage.take_text(chunk.get("choices"))
                if chunk.get("usage"):
                    usage.usage = chunk["usage"]
                    if include_usage and usage.decorate:
                        usage.decorate(chunk["usage"])
                        yield b"data: " + wire_json.dumps(chunk) + b"\n\n"
                        continue
                if "usage" in chunk and not include_usage:
                    # requested upstream for accounting, not by the client: OpenAI then puts "usage" (null
                    # until the last chunk) in every chunk, so every chunk is re-encoded without it
                    del chunk["usage"]
                    if chunk.get("choices"):
                        yield b"data: " + wire_json.dumps(chunk) + b"\n\n"
                    continue
                yield b"data: " + payload + b"\n\n"
        except TimeoutError:
            raise GatewayError(504, "The provider stopped sending in time.", type="server_error",
                               code="provider_timeout") from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError):
            raise GatewayError(502, "The provider's stream broke off.", type="server_error",
                               code="provider_error") from None
    raise GatewayError(502, "The provider's stream ended without completing.", type="server_error",
                       code="provider_error")
