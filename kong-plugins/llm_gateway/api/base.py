"""What every endpoint gives the listener, the router and the ledger, so one pipeline serves them all.

The listener owns what is common to every LLM request (body, ticket, the alias and the consumer's access to it,
budgets, routing with retries and fallbacks, the one settlement, the headers); an endpoint owns only its wire:
how a body becomes an ``ApiRequest``, how a deployment is called for it (JSON and SSE), and how an error is
written in its clients' format. Data flows one way: listener → endpoint.parse → router → endpoint.complete /
endpoint.open_stream → provider; usage comes back once, through the ``Usage`` the call filled.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from llm_gateway.errors import GatewayError

if TYPE_CHECKING:
    from llm_gateway.config import Deployment, GatewayConfig
    from llm_gateway.providers.openai_compatible import Usage


class ApiRequest(Protocol):
    """One validated client request, as the ledger and the router see it, whatever its endpoint."""

    endpoint: str  # the record's and the metrics' name for it: "chat.completions", "embeddings", "messages", ...
    model: str  # the alias the client named
    stream: bool
    params: dict[str, Any]  # what the provider call is built from; the ledger may lower a completion limit
    limit_keys: tuple[str, ...]  # the completion limits in ``params`` a budget may cap ("max_tokens", ...)

    def prompt_tokens(self, model: str) -> int:
        """An estimate of the prompt's tokens on ``model`` (budget reservations; usage no provider reported)."""
        ...

    def chat_view(self) -> dict[str, Any]:
        """The request as an OpenAI chat body (``messages``, ``tools``, ...), for what reads requests that way:
        complexity routing (routing/complexity.py). Never raises."""
        ...


class ErrorFormat(Protocol):
    """How an endpoint's clients expect an error: as the body of an error response, and as the event that ends
    a stream already begun."""

    def body(self, err: GatewayError) -> str: ...

    def stream_event(self, err: GatewayError) -> bytes: ...


class OpenAIErrors:
    """OpenAI's ``{"error": {message, type, param, code}}``; a stream ends with it as a ``data:`` line."""

    def body(self, err: GatewayError) -> str:
        return err.json()

    def stream_event(self, err: GatewayError) -> bytes:
        return b"data: " + err.json().encode() + b"\n\n"


# Anthropic's error types by HTTP status (docs.anthropic.com, "Errors"); 529 is its overloaded_error
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(err: GatewayError) -> dict[str, Any]:
    """The error as Anthropic's SDKs parse it: ``{"type": "error", "error": {"type", "message"}}``. The gateway's
    own code (``budget_exceeded``, ``model_not_found``, ...) rides along in ``error.code``, which Anthropic's
    SDKs ignore and a person reading the body can use."""
    kind = ANTHROPIC_ERROR_TYPES.get(err.status) or ("api_error" if err.status >= 500 else "invalid_request_error")
    error: dict[str, Any] = {"type": kind, "message": err.message}
    if err.code:
        error["code"] = err.code
    if err.param:
        error["param"] = err.param
    return {"type": "error", "error": error}


class AnthropicErrors:
    """Anthropic's error shape; a stream ends with an ``event: error``."""

    def body(self, err: GatewayError) -> str:
        return json.dumps(anthropic_error(err), separators=(",", ":"))

    def stream_event(self, err: GatewayError) -> bytes:
        return b"event: error\ndata: " + self.body(err).encode() + b"\n\n"


OPENAI_ERRORS = OpenAIErrors()
ANTHROPIC_ERRORS = AnthropicErrors()


class Endpoint(Protocol):
    """An LLM endpoint the listener serves through the common pipeline (see the module docstring)."""

    name: str  # == ApiRequest.endpoint of what ``parse`` returns
    path: str  # e.g. "/v1/embeddings"
    errors: ErrorFormat
    stream_end: bytes  # written after the last event of a stream that ended well (b"data: [DONE]\n\n" on chat)

    def parse(self, body: bytes) -> ApiRequest:
        """The request, validated; GatewayError 400 (``param`` naming the field) when it is not acceptable."""
        ...

    async def complete(self, deployment: Deployment, request: ApiRequest, usage: Usage) -> bytes:
        """One JSON answer from ``deployment``, in this endpoint's format; ``usage`` gets what the provider reported.
        Provider failures raise GatewayError (``errors.from_provider_exception``), so the router can retry them."""
        ...

    async def open_stream(self, deployment: Deployment, request: ApiRequest, usage: Usage) -> AsyncIterator[bytes]:
        """The answer as SSE events in this endpoint's format. Produces the first event before returning, so a
        provider failing before its first byte fails here (and can be retried); ``usage`` is filled as the events
        pass, the final usage included."""
        ...


@dataclass(frozen=True)
class Admitted:
    """A request the ticket vouched for, as a ``DirectEndpoint`` gets it."""

    config: GatewayConfig
    consumer_username: str | None
    consumer_id: str | None
    body: bytes  # Content-Encoding undone; b"" on a GET
    request_id: str
    match: dict[str, str] = field(default_factory=dict)  # the path's variables (aiohttp's match_info)

    def may_use(self, alias: str) -> bool:
        """``model_access``: whether this consumer may use the alias."""
        return self.config.allowed(alias, self.consumer_username, self.consumer_id)


class DirectEndpoint(Protocol):
    """An endpoint the gateway answers itself: nothing is charged and no deployment's health is at stake (the
    model list, token counts). Ticket, body limits and error format are the listener's, as for LLM endpoints."""

    name: str
    method: str  # "GET" or "POST"
    path: str  # an aiohttp route pattern, e.g. "/v1/models/{model_id:.+}"
    errors: ErrorFormat

    async def answer(self, request: Admitted) -> bytes:
        """The JSON body of a 200; GatewayError for anything else."""
        ...
