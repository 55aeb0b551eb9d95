"""The loopback HTTP listener Kong proxies LLM requests to: ticket check, validation, provider call, answer.

Every endpoint of ``api/registry.py`` is served here by one pipeline: body, ticket, the alias and the
consumer's access to it, budgets, routing (retries, fallbacks), the answer (JSON or SSE), one settlement. An
endpoint contributes only its wire (``api/base.py``); errors are written in its clients' format.

Answering here rather than through ``kong.response.exit`` is what lets SSE stream: Kong proxies whatever this
listener writes, chunk by chunk, and keeps the client connection to itself (see docs/architecture.md).

Every request ends the same way whatever happened (see ``_Exchange``): one HTTP response (once a stream has
begun, nothing but the stream is ever written), one settlement of its accounting, and one count in
``llm_gateway_requests``. A client that leaves is a normal event (499), not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web

from llm_gateway.accounting.ledger import Ledger
from llm_gateway.api import registry
from llm_gateway.api.base import (
    OPENAI_ERRORS,
    Admitted,
    ApiRequest,
    DirectEndpoint,
    Endpoint,
    ErrorFormat,
)
from llm_gateway.config import Alias, Deployment, GatewayConfig
from llm_gateway.errors import GatewayError, from_provider_exception, internal_error
from llm_gateway.kong import ticket
from llm_gateway.listener import content_encoding
from llm_gateway.listener.strict_server import HEADER_TIMEOUT, StrictAppRunner, set_server_header
from llm_gateway.operations import logs, tracing
from llm_gateway.providers.upstream import target_of
from llm_gateway.routing.complexity import score_request
from llm_gateway.routing.router import Routed
from llm_gateway.runtime import Runtime

log = logging.getLogger("llm_gateway.listener")
T = TypeVar("T")

MAX_BODY_CEILING = 64 * 1024 * 1024 + 1  # the schema's largest max_body_bytes; per-route limits are tighter
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
BODY_TIMEOUT = 5.0  # Kong buffers the client's body and sends it whole: a body still arriving is not Kong
ECHO_LIMIT = 256  # client-supplied values quoted in an error message are cut here


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """A client-supplied value as an error message may quote it: at most ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def client_request_id_of(request: web.Request) -> str | None:
    """The client's own X-Request-ID (Kong forwards client headers), if it differs from Kong's: printable
    ASCII, at most 200 characters, so it is safe in a header and a record."""
    value = request.headers.get("X-Request-ID")
    if not value or value == request.headers.get("X-Kong-Request-Id"):
        return None
    value = "".join(c for c in value[:200] if " " <= c <= "~").strip()
    return value or None


def error_response(err: GatewayError, headers: dict[str, str], errors: ErrorFormat = OPENAI_ERRORS) -> web.Response:
    extra = {k: v for k, v in err.headers.items() if k.lower() != "connection"}
    response = web.Response(status=err.status, text=errors.body(err), content_type="application/json",
                            headers={**headers, **extra})
    if err.headers.get("Connection", "").lower() == "close":
        response.force_close()
    return response


@dataclass
class _Exchange:
    """One request as the listener answers it: what the client has been told so far, and its accounting.

    ``response`` is set once a stream's headers are out: from then on nothing but that stream may be written.
    ``status`` and friends are what ``_settle`` records when the request ends."""

    headers: dict[str, str]
    errors: ErrorFormat = OPENAI_ERRORS
    started: float = field(default_factory=time.monotonic)
    ledger: Ledger | None = None
    settled: bool = False
    response: web.StreamResponse | None = None
    consumer: str | None = None  # None until a ticket vouched for the request
    alias: str = ""  # the route's alias the request named, once known to exist
    status: int = 500
    error_code: str | None = "internal_error"
    truncated: bool = False

    @property
    def request_id(self) -> str:
        return self.headers["X-Request-ID"]

    def told(self, status: int, error_code: str | None = None, *, truncated: bool = False) -> None:
        self.status, self.error_code, self.truncated = status, error_code, truncated


def _exists(endpoints: tuple[Endpoint, ...], direct: tuple[DirectEndpoint, ...]) -> str:
    """The endpoints that exist, as a 404 names them."""
    served = [f"POST {e.path}" for e in endpoints] + [f"{d.method} {d.path.split('{')[0]}{{id}}" if "{" in d.path
                                                      else f"{d.method} {d.path}" for d in direct]
    return ", ".join(served)


def errors_by_path(endpoints: tuple[Endpoint, ...]) -> Callable[[str], ErrorFormat]:
    """The error format a client of a path expects when no endpoint took the request (404, 405): that of the
    endpoint whose path it is or lies under (Anthropic's under /v1/messages), else OpenAI's."""
    formats = sorted(((e.path, e.errors) for e in endpoints), key=lambda pair: -len(pair[0]))

    def errors_for(path: str) -> ErrorFormat:
        return next((errors for prefix, errors in formats if path == prefix or path.startswith(prefix + "/")),
                    OPENAI_ERRORS)
    return errors_for


class Listener:
    """The aiohttp application serving every endpoint of ``api/registry.py`` for requests Kong has admitted."""

    def __init__(self, runtime: Runtime, *, header_timeout: float = HEADER_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT, endpoints: tuple[Endpoint, ...] = registry.ENDPOINTS,
                 direct: tuple[DirectEndpoint, ...] = registry.DIRECT_ENDPOINTS) -> None:
        self.runtime = runtime
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.app = web.Application(client_max_size=MAX_BODY_CEILING, middlewares=[self._http_errors])
        for endpoint in direct:  # before the LLM endpoints: /v1/messages/count_tokens is not /v1/messages
            self.app.router.add_route(endpoint.method, endpoint.path, self._direct_handler(endpoint))
        for llm in endpoints:
            self.app.router.add_post(llm.path, self._llm_handler(llm))
        self.existing = _exists(endpoints, direct)
        self.errors_for = errors_by_path(endpoints)
        self.app.on_response_prepare.append(set_server_header)

    def make_runner(self, **kwargs: object) -> web.AppRunner:
        """The runner to bind this listener with (``web.TCPSite``): aiohttp's, made strict (header deadline,
        idle timeout, header size limits, raw request bodies, OpenAI-shaped parse errors)."""
        return StrictAppRunner(self.app, header_timeout=self.header_timeout,
                               on_answer=lambda status: self.runtime.metrics.answered(status), **kwargs)

    @web.middleware
    async def _http_errors(self, request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """aiohttp's own answers (no such route, wrong method) in the path's error format, and counted."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers: dict[str, str] = {}
            if isinstance(exc, web.HTTPMethodNotAllowed):
                allowed = ", ".join(sorted(exc.allowed_methods))
                headers["Allow"] = allowed
                err = GatewayError(405, f"{echo(request.method, 32)} is not allowed on {echo(request.path)}; use "
                                   f"{allowed}.", code="method_not_allowed")
            elif isinstance(exc, web.HTTPNotFound):
                err = GatewayError(404, f"No endpoint at {echo(request.method, 32)} {echo(request.path)}. This "
                                   f"gateway serves: {self.existing}.", code="unknown_url")
            else:
                err = GatewayError(exc.status, exc.reason, code=None)
            self.runtime.metrics.answered(err.status)
            return error_response(err, headers, self.errors_for(request.path))

    async def _read_body(self, request: web.Request, config: GatewayConfig) -> bytes:
        """The raw body, as Kong forwarded it, within body_timeout and the route's max_body_bytes (a declared
        length over it is refused before a byte is read)."""
        if (request.content_length or 0) > config.max_body_bytes:
            raise _too_large(config)
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(config) from None
        except TimeoutError:
            raise GatewayError(408, f"The request body did not arrive within {self.body_timeout:g} s.",
                               code="request_timeout", headers={"Connection": "close"}) from None
        if len(body) > config.max_body_bytes:
            raise _too_large(config)
        return body

    def _admit(self, request: web.Request) -> tuple[GatewayConfig, ticket.Claims]:
        """The ticket check, before the body is read: only requests minted by our access phase in Kong get
        further."""
        try:
            claims = self.runtime.tickets.verify(request.headers.get(ticket.HEADER))
        except ticket.RetryableTicket as exc:
            log.warning("a request reached the listener with %s (plugin server restarting?)", exc)
            raise GatewayError(503, "The gateway is restarting; retry the request.", type="server_error",
                               code="gateway_restarting", headers={"Retry-After": "1"}) from None
        except ticket.TicketError as exc:
            log.warning("refused a request without a valid ticket: %s", exc)
            raise GatewayError(403, "Requests must come through the Kong gateway.", type="permission_error",
                               code="gateway_bypass") from None
        config = self.runtime.registry.get(claims.config_key)
        if config is None:  # the route's config was replaced long ago; the client can simply retry
            raise GatewayError(503, "The gateway configuration changed; retry the request.",
                               type="server_error", code="config_reloaded", headers={"Retry-After": "1"})
        return config, claims

    def _exchange(self, request: web.Request, errors: ErrorFormat) -> _Exchange:
        kong_id = request.headers.get("X-Kong-Request-Id", "")[:64]  # Kong's is 32 hex digits; a bypass may send any
        ex = _Exchange(headers={"X-Request-ID": kong_id or uuid.uuid4().hex}, errors=errors)
        ex.headers["X-LLM-Gateway-Process"] = str(os.getpid())  # which process served it (kong/workers.py)
        logs.request_id.set(ex.request_id)  # every log line of this request's task carries it
        client_request_id = client_request_id_of(request)
        if client_request_id:  # Kong's id stays X-Request-ID; the client's own is echoed, not lost
            ex.headers["X-Client-Request-ID"] = client_request_id
        return ex

    def _llm_handler(self, endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            ex = self._exchange(request, endpoint.errors)
            tracing.start_request(request.headers, ex.request_id)  # nothing when tracing is off
            try:
                return await self._serve(request, endpoint, ex)
            except GatewayError as err:
                return await self._fail(ex, err)
            except (ConnectionError, asyncio.CancelledError):
                ex.told(499, "client_disconnected", truncated=ex.response is not None)
                log.info("request %s: the client left before the answer", ex.request_id)
                raise
            except Exception:
                log.exception("request %s failed", ex.request_id)
                return await self._fail(ex, internal_error())
            finally:
                await self._settle(ex)
        return handle

    def _direct_handler(self, endpoint: DirectEndpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            ex = self._exchange(request, endpoint.errors)
            try:
                config, claims = self._admit(request)
                raw = await self._read_body(request, config)
                ex.consumer = claims.consumer_username or claims.consumer_id or ""
                body = await content_encoding.decode(raw, request.headers.get("Content-Encoding"),
                                                     config.max_body_bytes)
                admitted = Admitted(config=config, consumer_username=claims.consumer_username or None,
                                    consumer_id=claims.consumer_id or None, body=body, request_id=ex.request_id,
                                    match=dict(request.match_info))
                answer = await endpoint.answer(admitted)
                ex.told(200)
                return web.Response(status=200, body=answer, content_type="application/json", headers=ex.headers)
            except GatewayError as err:
                ex.told(err.status, err.code)
                return error_response(err, ex.headers, endpoint.errors)
            except Exception:
                log.exception("request %s failed", ex.request_id)
                err = internal_error()
                ex.told(err.status, err.code)
                return error_response(err, ex.headers, endpoint.errors)
            finally:
                self.runtime.metrics.answered(ex.status, consumer=ex.consumer, alias=ex.alias)
        return handle

    async def _serve(self, request: web.Request, endpoint: Endpoint, ex: _Exchange) -> web.StreamResponse:
        headers = ex.headers
        config, claims = self._admit(request)
        raw = await self._read_body(request, config)
        ex.consumer = claims.consumer_username or claims.consumer_id or ""
        body = await content_encoding.decode(raw, request.headers.get("Content-Encoding"), config.max_body_bytes)
        api = endpoint.parse(body)
        consumer = claims.consumer_username or claims.consumer_id or None
        alias = config.models.get(api.model)
        if alias is None:
            raise GatewayError(404, f"The model '{echo(api.model)}' does not exist on this route.",
                               param="model", code="model_not_found")
        ex.alias = alias.name
        if not config.allowed(alias.name, claims.consumer_username, claims.consumer_id):
            raise GatewayError(403, f"This consumer may not use the model '{echo(api.model)}'.",
                               type="permission_error", param="model", code="model_not_allowed")
        complexity = None
        if alias.complexity is not None:
            complexity = score_request(api.chat_view())  # never raises
            strong = complexity.score >= alias.complexity.threshold
            alias = config.models[alias.complexity.strong if strong else alias.complexity.weak]
            headers["X-LLM-Complexity"] = f"{complexity.score:.3f}; routed={alias.name}"
        first = alias.deployments[0]
        ledger = ex.ledger = Ledger(self.runtime, config, request_id=ex.request_id, consumer=consumer,
                                    consumer_id=claims.consumer_id or None, request=api, deployment=first,
                                    target=target_of(first), started=ex.started)
        if complexity is not None:
            ledger.complexity = (complexity.score, alias.name)
        ledger.client_request_id = headers.get("X-Client-Request-ID")
        headers.update(await ledger.admit())  # 429/503 when the consumer's budgets say no (recorded)
        return await self._answer(request, config, alias, endpoint, api, ex)

    async def _fail(self, ex: _Exchange, err: GatewayError) -> web.StreamResponse:
        """The answer for a request that failed: an error response, or, when a stream has already begun (its
        status line is out), an error event ending that stream: never a second response inside the first."""
        if ex.response is None:
            ex.told(err.status, err.code)
            return error_response(err, ex.headers, ex.errors)
        await _end_stream(ex.response, err, ex.errors)
        return ex.response

    async def _finish(self, ex: _Exchange) -> dict[str, str]:
        """Settle the request's accounting once, with what the client was told; a failure here is logged in one
        line and the answer still counted, and never changes what the client gets."""
        if ex.settled:
            return {}
        ex.settled = True
        if ex.ledger is None:
            self.runtime.metrics.answered(ex.status, consumer=ex.consumer, alias=ex.alias)
            return {}
        try:
            return await ex.ledger.finish(ex.status, error_code=ex.error_code, truncated=ex.truncated)
        except Exception as exc:
            log.error("accounting of request %s (status %d) failed: %s", ex.request_id, ex.status,
                      type(exc).__name__)
            log.debug("accounting failure of request %s", ex.request_id, exc_info=True)
            self.runtime.metrics.answered(ex.status, consumer=ex.consumer, alias=ex.alias)
            return {}

    async def _settle(self, ex: _Exchange) -> None:
        """The last word on every request (a ``finally``): its accounting, if nothing settled it yet."""
        with contextlib.suppress(Exception):  # _finish logs its own failures; this must not raise past aiohttp
            await self._finish(ex)
        with contextlib.suppress(Exception):
            tracing.end_request(ex.status, ex.error_code)

    async def _route(self, config: GatewayConfig, alias: Alias, api: ApiRequest, ex: _Exchange,
                     call: Callable[[Deployment], Awaitable[T]]) -> Routed[T]:
        """Retries and fallbacks happen here, before any byte reaches the client; the headers say how it went."""
        ledger, headers = ex.ledger, ex.headers
        assert ledger is not None

        def on_attempt(serving: Alias, deployment: Deployment) -> None:
            ledger.attempt(deployment, target_of(deployment))
            ledger.serving_alias = serving.name if serving.name != alias.name else None
            tracing.attempt(serving.name, deployment)

        try:
            routed = await self.runtime.router.route(config, alias, ex.request_id, tracing.traced_call(call),
                                                     on_attempt)
        except GatewayError as err:
            headers["X-LLM-Attempts"] = str(ledger.attempts)
            ex.told(err.status, err.code)
            headers.update(await self._finish(ex))
            raise
        target = target_of(routed.deployment)
        if ledger.usage.dropped:  # the alias's drop_params at work: never silently
            headers["X-LLM-Dropped-Params"] = ", ".join(ledger.usage.dropped)
        headers.update({"X-LLM-Provider": target.provider, "X-LLM-Model": target.model,
                        "X-LLM-Deployment": routed.deployment.id, "X-LLM-Attempts": str(routed.attempts)})
        if routed.fallback:
            headers["X-LLM-Fallback"] = routed.fallback
            self.runtime.metrics.fallback(api.model, target_of(alias.deployments[0]).provider,
                                          target.provider)
        return routed

    async def _answer(self, request: web.Request, config: GatewayConfig, alias: Alias, endpoint: Endpoint,
                      api: ApiRequest, ex: _Exchange) -> web.StreamResponse:
        ledger, headers = ex.ledger, ex.headers
        assert ledger is not None
        if not api.stream:
            routed = await self._route(config, alias, api, ex, lambda d: endpoint.complete(d, api, ledger.usage))
            ledger.answered = True
            try:
                if request.transport is None or request.transport.is_closing():
                    ex.told(499, "client_disconnected")  # Kong closed the connection: its client left (charged)
                else:
                    ex.told(200)
                headers.update(await self._finish(ex))
            finally:
                await _quietly(routed.done(ledger.total_tokens), "releasing the deployment", ex)
            return web.Response(status=200, body=routed.result, content_type="application/json", headers=headers)
        # a provider failing before its first event fails inside the router, while a status code can still say so
        streamed = await self._route(config, alias, api, ex, lambda d: endpoint.open_stream(d, api, ledger.usage))
        events = streamed.result
        ledger.first_byte = time.monotonic()
        response = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
        try:
            await response.prepare(request)
            ex.response = response  # from here on, only this stream may be written
            ex.told(200)
            async for event in ledger.guard(events):  # stream limits and the reservation (providers/stream_limits.py)
                await response.write(event)
            if endpoint.stream_end:
                await response.write(endpoint.stream_end)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:
            ex.told(499, "client_disconnected", truncated=True)  # nginx's code for a client that left
            log.info("stream %s: the client left before its end", ex.request_id)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception as exc:
            # bytes are already out: end the stream with an explicit error event, never a silent cut
            err = exc if isinstance(exc, GatewayError) else from_provider_exception(exc)
            ex.told(err.status, err.code, truncated=True)
            log.warning("stream %s failed after the first byte: %s", ex.request_id, err.code)
            if ex.response is None:
                raise  # the stream never started: an ordinary error response can still say so
            await _end_stream(response, err, ex.errors)
        finally:
            await _quietly(events.aclose(), "closing the provider stream", ex)  # stop reading from the provider
            await self._finish(ex)
            await _quietly(streamed.done(ledger.total_tokens), "releasing the deployment", ex)
        return response


async def _end_stream(response: web.StreamResponse, err: GatewayError, errors: ErrorFormat) -> None:
    """End a begun SSE stream with an error event (in the endpoint's format) and a proper end of the chunked
    body; a client already gone is no error."""
    with contextlib.suppress(Exception):
        await response.write(errors.stream_event(err))
    with contextlib.suppress(Exception):
        await response.write_eof()


async def _quietly(step: Awaitable[object], what: str, ex: _Exchange) -> None:
    """A clean-up step that must not stop the next one: its failure is logged in one line."""
    try:
        await step
    except Exception as exc:
        log.warning("request %s: %s failed: %s", ex.request_id, what, type(exc).__name__)


def _too_large(config: GatewayConfig) -> GatewayError:
    return GatewayError(413, f"The request body is larger than {config.max_body_bytes} bytes.",
                        code="request_too_large")
