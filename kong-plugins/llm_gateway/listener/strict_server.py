"""aiohttp's HTTP server, made strict for a listener whose only legitimate client is Kong.

aiohttp has no deadline for reading request headers (its keep-alive timer only closes idle connections, and
waits an hour by default): a client that sends half a request holds a connection and a file descriptor for as
long as it likes, and a few thousand such clients starve Kong of connections. Kong sends each request whole and
at once, so this server gives a connection ``header_timeout`` seconds from its first byte (or from accepting it)
to complete a request's headers, and drops it otherwise. Idle keep-alive connections (Kong's upstream pool) are
closed after ``keepalive_timeout``, which must outlast Kong's ``upstream_keepalive_idle_timeout`` (60 s) so the
listener never closes a connection Kong is about to reuse.

A request aiohttp cannot parse gets OpenAI's error JSON instead of aiohttp's ``text/plain`` page, is logged in
one line without a traceback, is counted, and closes its connection; no response says ``Server: Python/aiohttp``.

This reaches into ``aiohttp.web_protocol.RequestHandler``'s internals (``_request_count``, ``_waiter``); the
tests in tests/listener/test_listener_hardening.py exercise each of them against the installed aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from llm_gateway.errors import GatewayError

log = logging.getLogger("llm_gateway.listener")

SERVER_NAME = "llm-gateway"
HEADER_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 75.0  # > Kong's upstream_keepalive_idle_timeout default of 60 s
MAX_LINE_SIZE = 8190  # request line; nginx's large_client_header_buffers is 8k, so Kong never sends more
MAX_FIELD_SIZE = 8190  # one header line
MAX_HEADERS = 128
LINGERING_TIME = 2.0  # after an early answer (413, 408), how long the rest of a body is read and dropped


def malformed_request_error(exc: BaseException | None, status: int) -> GatewayError:
    """What a client gets for a request aiohttp could not parse (never the parser's own text: it may quote bytes
    of the request)."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return GatewayError(431, "The request line or a header is too long.", code="request_header_too_large")
    if status == 400 or isinstance(exc, http_exceptions.HttpProcessingError):
        return GatewayError(400, "The request is not valid HTTP/1.1.", code="malformed_request")
    if status == 504:
        return GatewayError(504, "The gateway took too long to handle this request.", type="server_error",
                            code="timeout")
    return GatewayError(status, "The gateway failed to handle this request; it has been logged.",
                        type="server_error", code="internal_error")


class StrictRequestHandler(RequestHandler):
    """One connection: aiohttp's protocol plus a deadline on request headers and OpenAI-shaped parse errors."""

    def __init__(self, manager: web.Server, *, header_timeout: float, on_answer: Callable[[int], None],
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._on_answer = on_answer
        self._header_deadline: asyncio.TimerHandle | None = None
        self._requests_at_arm = 0

    def _arm_header_deadline(self) -> None:
        self._requests_at_arm = self._request_count
        self._header_deadline = self._loop.call_later(self._header_timeout, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self._request_count == self._requests_at_arm and self.transport is not None:
            log.debug("dropped a connection whose request headers did not arrive within %.1f s",
                      self._header_timeout)
            self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()  # a connection that never sends a byte is dropped too

    def data_received(self, data: bytes) -> None:
        # the first byte of a new request on an idle keep-alive connection (start() waiting for a message)
        idle = self._waiter is not None and not self._waiter.done()
        if self._header_deadline is None and idle and not self._messages:
            self._arm_header_deadline()
        super().data_received(data)
        if self._header_deadline is not None and self._request_count != self._requests_at_arm:
            self._disarm_header_deadline()  # the headers are complete; the handler bounds the body

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 and not isinstance(exc, http_exceptions.HttpProcessingError):
            self.logger.exception("request handler failed", exc_info=exc)
        else:
            log.warning("refused a malformed request: %s (%s)", type(exc).__name__ if exc else "bad request",
                        status)
        if request.writer.output_size > 0:  # as aiohttp: a response is on its way, the connection is broken
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        err = malformed_request_error(exc, status)
        self._on_answer(err.status)
        response = web.Response(status=err.status, text=err.json(), content_type="application/json",
                                headers={"Server": SERVER_NAME})
        response.force_close()
        return response


class StrictServer(web.Server):
    """aiohttp's low-level server, making StrictRequestHandler connections."""

    def __init__(self, *args: Any, header_timeout: float, on_answer: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._on_answer = on_answer

    def __call__(self) -> RequestHandler:
        return StrictRequestHandler(self, loop=self._loop, header_timeout=self._header_timeout,
                                    on_answer=self._on_answer, **self._kwargs)


class StrictAppRunner(web.AppRunner):
    """An AppRunner whose server is a StrictServer; bind it with ``web.TCPSite`` as usual."""

    def __init__(self, app: web.Application, *, header_timeout: float = HEADER_TIMEOUT,
                 on_answer: Callable[[int], None] = lambda status: None, **kwargs: Any) -> None:
        kwargs = {"access_log": None, "keepalive_timeout": KEEPALIVE_TIMEOUT, "max_line_size": MAX_LINE_SIZE,
                  "max_field_size": MAX_FIELD_SIZE, "max_headers": MAX_HEADERS, "lingering_time": LINGERING_TIME,
                  # decompression happens after the ticket check, bounded (listener/content_encoding.py)
                  "auto_decompress": False, **kwargs}
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._on_answer = on_answer

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return StrictServer(server.request_handler, request_factory=server.request_factory,
                            handler_cancellation=server.handler_cancellation, loop=server._loop,
                            header_timeout=self._header_timeout, on_answer=self._on_answer, **server._kwargs)


async def set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` hook: our name, not aiohttp's version, in every response's ``Server``."""
    response.headers["Server"] = SERVER_NAME
