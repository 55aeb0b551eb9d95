"""The loopback HTTP listener Kong proxies LLM requests to: ticket check, validation, provider call, answer.

Answering here rather than through ``kong.response.exit`` is what lets SSE stream: Kong proxies whatever this
listener writes, chunk by chunk, and keeps the client connection to itself (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from llm_gateway import providers, ticket
from llm_gateway.chat_request import ChatRequest, parse_chat_request
from llm_gateway.config import Deployment, GatewayConfig
from llm_gateway.errors import GatewayError, from_provider_exception, internal_error
from llm_gateway.openai_compatible import Usage
from llm_gateway.plugin import Runtime

log = logging.getLogger("llm_gateway.listener")

MAX_BODY_CEILING = 64 * 1024 * 1024 + 1  # the schema's largest max_body_bytes; per-route limits are tighter
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(err: GatewayError, headers: dict[str, str]) -> web.Response:
    return web.Response(status=err.status, text=err.json(), content_type="application/json",
                        headers={**headers, **err.headers})


class Listener:
    """The aiohttp application serving ``POST /v1/chat/completions`` for requests Kong has admitted."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.app = web.Application(client_max_size=MAX_BODY_CEILING)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_route("*", "/{tail:.*}", self.not_found)

    async def not_found(self, request: web.Request) -> web.Response:
        err = GatewayError(404, f"No LLM endpoint at {request.method} {request.path}.", code="unknown_url")
        return error_response(err, {})

    def _admit(self, request: web.Request, body: bytes) -> GatewayConfig:
        """The ticket check: only requests minted by our access phase in Kong get further."""
        try:
            claims = self.runtime.tickets.verify(request.headers.get(ticket.HEADER), body)
        except ticket.TicketError as exc:
            log.warning("refused a request without a valid ticket: %s", exc)
            raise GatewayError(403, "Requests must come through the Kong gateway.", type="permission_error",
                               code="gateway_bypass") from None
        config = self.runtime.registry.get(claims.config_key)
        if config is None:  # the route's config was replaced long ago; the client can simply retry
            raise GatewayError(503, "The gateway configuration changed; retry the request.",
                               type="server_error", code="config_reloaded", headers={"Retry-After": "1"})
        if not claims.body_bound or len(body) > config.max_body_bytes:
            raise GatewayError(413, f"The request body is larger than {config.max_body_bytes} bytes.",
                               code="request_too_large")
        return config

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        headers = {"X-Request-ID": request.headers.get("X-Kong-Request-Id") or uuid.uuid4().hex}
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise GatewayError(413, "The request body is too large.", code="request_too_large") from None
            config = self._admit(request, body)
            chat = parse_chat_request(body)
            alias = config.models.get(chat.model)
            if alias is None:
                raise GatewayError(404, f"The model '{chat.model}' does not exist on this route.",
                                   param="model", code="model_not_found")
            deployment = alias.deployments[0]
            target = providers.target_of(deployment)
            headers["X-LLM-Provider"] = target.provider
            headers["X-LLM-Model"] = target.model
            usage = Usage()
            if chat.stream:
                return await self._stream(request, chat, deployment, headers, usage)
            body = await providers.complete(deployment, chat.params, usage)
            return web.Response(status=200, body=body, content_type="application/json", headers=headers)
        except GatewayError as err:
            return error_response(err, headers)
        except Exception:
            log.exception("request %s failed", headers["X-Request-ID"])
            return error_response(internal_error(), headers)

    async def _stream(self, request: web.Request, chat: ChatRequest, deployment: Deployment,
                      headers: dict[str, str], usage: Usage) -> web.StreamResponse:
        # raises GatewayError if the provider fails before its first event: nothing is sent yet
        events = await providers.open_stream(deployment, chat.params, chat.include_usage, usage)
        response = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
        await response.prepare(request)
        try:
            await self._relay(response, events)
        except (ConnectionError, asyncio.CancelledError):
            await events.aclose()  # the client went away: stop reading from the provider
            raise
        return response

    async def _relay(self, response: web.StreamResponse, events: AsyncIterator[bytes]) -> None:
        try:
            async for event in events:
                await response.write(event)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # bytes are already out: end the stream with an explicit error event, never a silent cut
            err = exc if isinstance(exc, GatewayError) else from_provider_exception(exc)
            log.warning("stream failed after the first byte: %s", err.code)
            await response.write(b"data: " + err.json().encode() + b"\n\n")
            return
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
