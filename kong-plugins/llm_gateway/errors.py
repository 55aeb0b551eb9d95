"""Errors as clients see them: OpenAI's error JSON with the right status, and nothing internal.

Every failure a client can meet is a ``GatewayError``. Provider failures (LiteLLM exceptions) are mapped by
``from_provider_exception``, which keeps the provider's own explanation only for requests the provider
rejected as invalid (the client's fault, so the client needs it), scrubbed of URLs and anything key-shaped;
everything else gets a fixed message, so provider keys and internal addresses cannot leak.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

_URL = re.compile(r"\b(?:https?|wss?|unix)://\S+", re.IGNORECASE)
_KEYISH = re.compile(r"\b(?:sk|pk|rk|key|sess)[-_][A-Za-z0-9_\-]{8,}|\b[A-Za-z0-9_\-]{32,}\b")
_LITELLM_PREFIX = re.compile(r"^(?:litellm\.\w+:\s*)?(?:\w+Exception\s*-\s*)?", re.IGNORECASE)
_UNSUPPORTED = re.compile(r"does not support parameters: \[([^\]]*)\]")
DEFAULT_RETRY_AFTER = 1


class GatewayError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> str:
        return json.dumps(self.body())


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def internal_error() -> GatewayError:
    return GatewayError(500, "The gateway failed to handle this request; it has been logged.",
                        type="server_error", code="internal_error")


def scrub(text: str, limit: int = 500) -> str:
    """A provider message made safe to show: no URLs, nothing key-shaped, bounded length."""
    text = _LITELLM_PREFIX.sub("", text.strip())
    text = _URL.sub("[url]", text)
    text = _KEYISH.sub("[redacted]", text)
    return text[:limit]


def _provider_message(exc: BaseException) -> str:
    """The provider's own error message if its body carried one, else LiteLLM's text."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return scrub(inner["message"])
    return scrub(str(getattr(exc, "message", None) or exc))


def retry_after_seconds(exc: BaseException) -> int:
    """Seconds from the provider's Retry-After (or retry-after-ms) header, else a short default."""
    for source in (getattr(exc, "headers", None), getattr(getattr(exc, "response", None), "headers", None),
                   getattr(exc, "litellm_response_headers", None)):
        if not source:
            continue
        try:
            if (ms := source.get("retry-after-ms")) is not None:
                return max(1, math.ceil(float(ms) / 1000))
            if (seconds := source.get("retry-after")) is not None:
                return max(1, math.ceil(float(seconds)))
        except (TypeError, ValueError):
            continue
    return DEFAULT_RETRY_AFTER


def _status_error_message(body: bytes) -> tuple[str | None, str | None]:
    """(message, code) from a provider's error JSON, OpenAI's or Anthropic's shape."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    inner = data.get("error", data) if isinstance(data, dict) else None
    if not isinstance(inner, dict):
        return None, None
    message = inner.get("message")
    code = inner.get("code") or inner.get("type")
    return (scrub(message) if isinstance(message, str) else None), (code if isinstance(code, str) else None)


def from_provider_status(status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
    """Map a provider's HTTP error answer (raw, not through LiteLLM) to what the client sees."""
    message, code = _status_error_message(body)
    if status == 429:
        seconds = retry_after_seconds(SimpleNamespace(headers=headers))
        return GatewayError(429, f"The provider is rate limiting requests; retry after {seconds} s.",
                            type="rate_limit_error", code="rate_limit_exceeded",
                            headers={"Retry-After": str(seconds)})
    if status in (400, 422):
        if code == "context_length_exceeded":
            return GatewayError(400, message or "The prompt is longer than the model's context window.",
                                code="context_length_exceeded", param="messages")
        if code in ("content_policy_violation", "content_filter"):
            return GatewayError(400, message or "The provider's content policy refused the request.",
                                code="content_policy_violation")
        return GatewayError(400, f"The provider rejected the request: {message or 'no reason given'}",
                            code="provider_rejected_request")
    if status == 413:
        return GatewayError(413, "The provider refused the request as too large.", code="request_too_large")
    if status in (401, 403):
        return GatewayError(502, "The provider refused the gateway's credentials.", type="server_error",
                            code="provider_auth_error")
    if status == 404:
        return GatewayError(502, "The provider does not serve the configured model.", type="server_error",
                            code="provider_model_not_found")
    if status in (408, 504):
        return GatewayError(504, "The provider did not answer in time.", type="server_error",
                            code="provider_timeout")
    return GatewayError(502, "The provider failed to answer.", type="server_error", code="provider_error")


def from_provider_exception(exc: BaseException) -> GatewayError:
    """Map a LiteLLM (or transport) exception raised by a provider call to what the client sees."""
    import litellm  # imported here: this module must stay importable without LiteLLM (query_cmd)

    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, litellm.UnsupportedParamsError):
        names = _UNSUPPORTED.search(str(exc))
        listed = names.group(1).replace("'", "") if names else "some of the parameters sent"
        return GatewayError(400, f"The model behind this alias does not support: {listed}.",
                            code="unsupported_parameter")
    if isinstance(exc, litellm.ContextWindowExceededError):
        return GatewayError(400, _provider_message(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, litellm.ContentPolicyViolationError):
        return GatewayError(400, _provider_message(exc), code="content_policy_violation")
    if isinstance(exc, litellm.RateLimitError):
        seconds = retry_after_seconds(exc)
        return GatewayError(429, f"The provider is rate limiting requests; retry after {seconds} s.",
                            type="rate_limit_error", code="rate_limit_exceeded",
                            headers={"Retry-After": str(seconds)})
    if isinstance(exc, litellm.Timeout):
        return GatewayError(504, "The provider did not answer in time.", type="server_error",
                            code="provider_timeout")
    if isinstance(exc, litellm.AuthenticationError | litellm.PermissionDeniedError):
        return GatewayError(502, "The provider refused the gateway's credentials.", type="server_error",
                            code="provider_auth_error")
    if isinstance(exc, litellm.NotFoundError):
        return GatewayError(502, "The provider does not serve the configured model.", type="server_error",
                            code="provider_model_not_found")
    if isinstance(exc, litellm.BadRequestError | litellm.UnprocessableEntityError):
        return GatewayError(400, f"The provider rejected the request: {_provider_message(exc)}",
                            code="provider_rejected_request")
    return GatewayError(502, "The provider failed to answer.", type="server_error", code="provider_error")
