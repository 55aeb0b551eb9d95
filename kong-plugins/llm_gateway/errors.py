"""Errors as clients see them: OpenAI's error JSON with the right status, and nothing internal.

Every failure a client can meet is a ``GatewayError``. LiteLLM's exceptions are classified here, once, for
both provider paths: ``from_build_exception`` for what LiteLLM raises while *building* the provider request
(nothing was sent, so it is the client's request that cannot be expressed: 400, never retried, never a
cooldown) and ``from_provider_exception`` for what a provider call raised (429/502/504, or the provider's own
400). Only a provider's explanation of why it rejected a request is shown, scrubbed of URLs, anything
key-shaped and LiteLLM Proxy advice; everything else gets a fixed message, so no Python exception text,
provider key or internal address can leak.

Every error also says whether a client retry helps (``x-should-retry``, honoured by the OpenAI and Anthropic
SDKs): the gateway retries provider failures itself, so an SDK retrying them too multiplies provider calls
(3 SDK attempts x 3 gateway attempts); a retry is welcome only where the gateway did not call a provider and
a short ``Retry-After`` says when it will.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

_URL = re.compile(r"\b(?:https?|wss?|unix)://\S+", re.IGNORECASE)
_KEYISH = re.compile(r"\b(?:sk|pk|rk|key|sess)[-_][A-Za-z0-9_\-]{8,}|\b[A-Za-z0-9_\-]{32,}\b")
_LITELLM_PREFIX = re.compile(r"^(?:litellm\.\w+:\s*)?(?:\w+Exception\s*-\s*)?", re.IGNORECASE)
_UNSUPPORTED = re.compile(r"does not support parameters: \[([^\]]*)\]")
# LiteLLM echoes the request after these, and its advice is for LiteLLM Proxy operators, not our clients
_ECHO = re.compile(r"\s*(?:Received Messages=|Received Model Group=|model_group=).*", re.DOTALL | re.IGNORECASE)
# ... and Python's own text is never the client's business (a sentence with any of these is left out)
_ADVICE = re.compile(r"litellm|drop_params|modify_params|user_url_allowed_hosts|Traceback|\bFile \"|NoneType"
                     r"|object has no attribute|object is not (?:iterable|subscriptable|callable)|<class '"
                     r"|\b\w+(?:Error|Exception)\(", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
DEFAULT_RETRY_AFTER = 1
SHOULD_RETRY = "x-should-retry"
# errors that retrying fixes and that the gateway did not retry itself: nothing was sent to a provider
RETRY_WELCOME = frozenset({"config_reloaded", "budget_exceeded", "budget_store_unavailable",
                           "no_healthy_deployment", "gateway_restarting"})
MAX_CLIENT_WAIT_S = 60  # the SDKs honour Retry-After only up to 60 s; beyond that a retry comes too early


def should_retry(status: int, code: str | None, headers: Mapping[str, str]) -> bool:
    """Whether a client retry is welcome: only for codes in RETRY_WELCOME with a Retry-After the SDKs honour.
    Provider failures were already retried by the router, and 4xx client errors repeat themselves."""
    if code not in RETRY_WELCOME:
        return False
    try:
        return float(headers.get("Retry-After", "0")) <= MAX_CLIENT_WAIT_S
    except ValueError:
        return False


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
        self.headers = dict(headers or {})
        self.headers.setdefault(SHOULD_RETRY, "true" if should_retry(status, code, self.headers) else "false")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> str:
        return json.dumps(self.body())


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def internal_error() -> GatewayError:
    return GatewayError(500, "The gateway failed to handle this request; it has been logged.",
                        type="server_error", code="internal_error")


class ProviderOverloaded(GatewayError):
    """A provider that said it is overloaded (503, Anthropic's 529 or ``overloaded_error``): on OpenAI's wire the
    same 502 ``provider_error`` as any provider failure (retried alike); Anthropic's endpoints answer it as
    their clients expect, an ``overloaded_error``."""


OVERLOADED_STATUSES = frozenset({503, 529})
_OVERLOADED = re.compile(r"[\"']type[\"']\s*:\s*[\"']overloaded_error[\"']")


def _failed_to_answer(overloaded: bool) -> GatewayError:
    kind = ProviderOverloaded if overloaded else GatewayError
    return kind(502, "The provider failed to answer.", type="server_error", code="provider_error")


def scrub(text: str, limit: int = 500) -> str:
    """A provider message made safe to show: no URLs, nothing key-shaped, bounded length."""
    text = _ECHO.sub("", _LITELLM_PREFIX.sub("", text.strip()))
    text = " ".join(s for s in _SENTENCE.split(text) if s and not _ADVICE.search(s)) or "no reason given"
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
    text = str(getattr(exc, "message", None) or exc)
    return scrub(_embedded_message(text) or text)


def _embedded_message(text: str) -> str | None:
    """The ``message`` of the provider's error JSON when LiteLLM quotes the body whole in its text (Cohere's
    ``CohereException - {"message": "..."}``), so the client reads the provider's sentence, not its JSON."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:])
    except (ValueError, RecursionError):
        return None
    inner = data.get("error", data) if isinstance(data, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    return message if isinstance(message, str) else None


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


def _status_error_message(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(message, code, param) from a provider's error JSON, OpenAI's or Anthropic's shape."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None, None, None
    inner = data.get("error", data) if isinstance(data, dict) else None
    if not isinstance(inner, dict):
        return None, None, None
    message, param = inner.get("message"), inner.get("param")
    code = inner.get("code") or inner.get("type")
    return ((scrub(message) if isinstance(message, str) else None), (code if isinstance(code, str) else None),
            (param[:100] if isinstance(param, str) else None))


def from_provider_status(status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
    """Map a provider's HTTP error answer (raw, not through LiteLLM) to what the client sees."""
    message, code, param = _status_error_message(body)
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
                            code="provider_rejected_request", param=param)
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
    return _failed_to_answer(status in OVERLOADED_STATUSES or code == "overloaded_error")


def unsupported_parameters(names: Sequence[str], where: str = "the model behind this alias") -> GatewayError:
    """The 400 for parameters a deployment cannot honour, naming the first (``param``) and listing all."""
    listed = ", ".join(names) or "some of the parameters sent"
    return GatewayError(400, f"Unsupported parameter(s) for {where}: {listed}. The route's operator can set "
                        f"drop_params on the alias to drop what a deployment cannot honour instead.",
                        param=names[0] if names else None, code="unsupported_parameter")


def named_parameters(exc: BaseException, sent: Iterable[str]) -> list[str]:
    """Which of the parameters sent a LiteLLM exception is about: its list when it has one, else the sent
    names its text mentions (e.g. "O-series models don't support temperature=0.2")."""
    text = str(getattr(exc, "message", None) or exc)
    if listed := _UNSUPPORTED.search(text):
        names = [n.strip().strip("'\"") for n in listed.group(1).split(",")]
        return [n for n in names if n]
    return [name for name in sent if re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text)]


def from_build_exception(exc: BaseException, sent: Iterable[str]) -> GatewayError:
    """An exception LiteLLM raised while building the provider request, before anything was sent: the request
    cannot be expressed for this provider, which is the client's to fix. Never retried, never a cooldown."""
    import litellm

    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, litellm.UnsupportedParamsError):
        return unsupported_parameters(named_parameters(exc, sent))
    if isinstance(exc, RecursionError | MemoryError):
        return bad_request("The request is nested too deeply to translate for this provider.")
    return bad_request("The request cannot be translated for the provider behind this alias: a message, content "
                       "part, tool or response_format has a shape its format cannot express.")


def from_provider_exception(exc: BaseException, sent: Iterable[str] = ()) -> GatewayError:
    """Map a LiteLLM (or transport) exception raised by a provider call to what the client sees."""
    import litellm  # imported here: this module must stay importable without LiteLLM (query_cmd)

    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, litellm.UnsupportedParamsError):
        return unsupported_parameters(named_parameters(exc, sent))
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
    # LiteLLM reports Anthropic's 529 (and 503) as a 500 whose text carries Anthropic's error type
    overloaded = getattr(exc, "status_code", None) in OVERLOADED_STATUSES \
        or bool(_OVERLOADED.search(str(getattr(exc, "message", None) or exc)))
    return _failed_to_answer(overloaded)
