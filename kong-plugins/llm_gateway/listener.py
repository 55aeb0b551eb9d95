"""The loopback HTTP listener Kong proxies LLM requests to: ticket check, validation, provider call, answer.

Answering here rather than through ``kong.response.exit`` is what lets SSE stream: Kong proxies whatever this
listener writes, chunk by chunk, and keeps the client connection to itself (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from llm_gateway import providers, ticket
from llm_gateway.chat_request import ChatRequest, parse_chat_request
from llm_gateway.complexity import score_request
from llm_gateway.config import Alias, Deployment, GatewayConfig
from llm_gateway.errors import GatewayError, from_provider_exception, internal_error
from llm_gateway.ledger import Ledger
from llm_gateway.router import Routed
from llm_gateway.runtime import Runtime

log = logging.getLogger("llm_gateway.listener")
T = TypeVar("T")

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

    def _admit(self, request: web.Request, body: bytes) -> tuple[GatewayConfig, ticket.Claims]:
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
        return config, claims

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        headers = {"X-Request-ID": request.headers.get("X-Kong-Request-Id") or uuid.uuid4().hex}
        ledger: Ledger | None = None
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise GatewayError(413, "The request body is too large.", code="request_too_large") from None
            config, claims = self._admit(request, body)
            chat = parse_chat_request(body)
            consumer = claims.consumer_username or claims.consumer_id or None
            alias = config.models.get(chat.model)
            if alias is None:
                raise GatewayError(404, f"The model '{chat.model}' does not exist on this route.",
                                   param="model", code="model_not_found")
            if not config.allowed(alias.name, claims.consumer_username, claims.consumer_id):
                raise GatewayError(403, f"This consumer may not use the model '{chat.model}'.",
                                   type="permission_error", param="model", code="model_not_allowed")
            complexity = None
            if alias.complexity is not None:
                complexity = score_request(chat.params)
                strong = complexity.score >= alias.complexity.threshold
                alias = config.models[alias.complexity.strong if strong else alias.complexity.weak]
                headers["X-LLM-Complexity"] = f"{complexity.score:.3f}; routed={alias.name}"
            first = alias.deployments[0]
            ledger = Ledger(self.runtime, config, request_id=headers["X-Request-ID"], consumer=consumer,
                            consumer_id=claims.consumer_id or None, chat=chat, deployment=first,
                            target=providers.target_of(first), started=started)
            if complexity is not None:
                ledger.complexity = (complexity.score, alias.name)
            headers.update(await ledger.admit())  # 429/503 when the consumer's budgets say no (recorded)
            return await self._answer(request, config, alias, chat, headers, ledger)
        except GatewayError as err:
            return error_response(err, headers)
        except Exception:
            log.exception("request %s failed", headers["X-Request-ID"])
            if ledger is not None:
                await ledger.finish(500, error_code="internal_error")
            return error_response(internal_error(), headers)

    async def _route(self, config: GatewayConfig, alias: Alias, chat: ChatRequest, headers: dict[str, str],
                     ledger: Ledger, call: Callable[[Deployment], Awaitable[T]]) -> Routed[T]:
        """Retries and fallbacks happen here, before any byte reaches the client; the headers say how it went."""
        def on_attempt(serving: Alias, deployment: Deployment) -> None:
            ledger.attempt(deployment, providers.target_of(deployment))
            ledger.serving_alias = serving.name if serving.name != alias.name else None

        try:
            routed = await self.runtime.router.route(config, alias, headers["X-Request-ID"], call, on_attempt)
        except GatewayError as err:
            headers["X-LLM-Attempts"] = str(ledger.attempts)
            headers.update(await ledger.finish(err.status, error_code=err.code))
            raise
        target = providers.target_of(routed.deployment)
        headers.update({"X-LLM-Provider": target.provider, "X-LLM-Model": target.model,
                        "X-LLM-Deployment": routed.deployment.id, "X-LLM-Attempts": str(routed.attempts)})
        if routed.fallback:
            headers["X-LLM-Fallback"] = routed.fallback
            self.runtime.metrics.fallback(chat.model, providers.target_of(alias.deployments[0]).provider,
                                          target.provider)
        return routed

    async def _answer(self, request: web.Request, config: GatewayConfig, alias: Alias, chat: ChatRequest,
                      headers: dict[str, str], ledger: Ledger) -> web.StreamResponse:
        if not chat.stream:
            routed = await self._route(config, alias, chat, headers, ledger,
                                       lambda d: providers.complete(d, chat.params, ledger.usage))
            try:
                headers.update(await ledger.finish(200))
            finally:
                await routed.done(ledger.total_tokens)
            return web.Response(status=200, body=routed.result, content_type="application/json", headers=headers)
        # a provider failing before its first event fails inside the router, while a status code can still say so
        streamed = await self._route(config, alias, chat, headers, ledger,
                                     lambda d: providers.open_stream(d, chat.params, chat.include_usage, ledger.usage))
        events = streamed.result
        ledger.first_byte = time.monotonic()
        response = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
        status, code, truncated = 200, None, False
        try:
            await response.prepare(request)
            async for event in ledger.guard(events):  # stream limits and the reservation (stream_limits.py)
                await response.write(event)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            status, code, truncated = 499, "client_disconnected", True  # nginx's code for a client that left
            raise
        except Exception as exc:
            # bytes are already out: end the stream with an explicit error event, never a silent cut
            err = exc if isinstance(exc, GatewayError) else from_provider_exception(exc)
            status, code, truncated = err.status, err.code, True
            log.warning("stream %s failed after the first byte: %s", headers["X-Request-ID"], err.code)
            with contextlib.suppress(ConnectionError):
                await response.write(b"data: " + err.json().encode() + b"\n\n")
        finally:
            await events.aclose()  # stop reading from the provider, whatever happened
            await ledger.finish(status, error_code=code, truncated=truncated)
            await streamed.done(ledger.total_tokens)
        return response
