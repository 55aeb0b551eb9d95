"""OpenTelemetry traces of LLM requests: one span per request, one per provider attempt, with the ``gen_ai.*``
semantic attributes; off by default, and then free.

Turned on by ``LLM_GATEWAY_TRACING=on`` (``configure``, called once by ``serve``): spans are exported over
OTLP/HTTP by the SDK's batch processor, configured by the standard variables (``OTEL_EXPORTER_OTLP_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_SERVICE_NAME``,
``OTEL_TRACES_SAMPLER``…). Needs the ``[tracing]`` extra (the image installs it).

The hooks are one line each where a request's life already has a seam, and each begins with ``if not
_enabled: return``, so with tracing off a request pays a few global lookups (bench/tracing_overhead.py):

* ``start_request`` (listener, when a request arrives): the request span (SERVER), continuing the W3C
  ``traceparent`` Kong forwards (from the client, or from Kong's ``opentelemetry`` plugin) instead of starting
  a new trace. The span lives in a context variable of the request's task, so the other hooks find it.
* ``attempt`` (the router's ``on_attempt``): an attempt span (CLIENT) per provider call; a retry or a
  fallback is also an event on the request span. ``traced_call`` wraps the router's call so an attempt span
  ends with its outcome (for a stream: when the first event is in hand).
* ``finish_request`` (the ledger's ``finish``, where every accounted request ends): usage, cost, response
  model, finish reasons, status. ``end_request`` (the listener's last word on every request) ends the span,
  also for requests refused before any accounting.

Never on a span: prompts, answers, provider keys, consumer credentials, tickets, API base URLs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger("llm_gateway.tracing")
T = TypeVar("T")

_enabled = False
_tracer: Any = None
_provider: Any = None
_propagator: Any = None
_kinds: Any = None
_status: Any = None
_error: Any = None  # StatusCode.ERROR
_in_context: Any = None  # opentelemetry.trace.set_span_in_context


@dataclass
class _Trace:
    """One request's spans."""

    span: Any
    alias: str = ""
    attempts: int = 0
    attempt: Any = None  # the attempt span under way
    attempt_error: str | None = None
    ended: bool = False
    finish_reasons: list[str] = field(default_factory=list)


_current: ContextVar[_Trace | None] = ContextVar("llm_gateway_trace", default=None)


def enabled() -> bool:
    return _enabled


def configure(env: Mapping[str, str] = os.environ, exporter: Any = None) -> bool:
    """Turn tracing on when ``LLM_GATEWAY_TRACING`` says so (or ``exporter`` is given: tests, benchmarks).
    Returns whether it is on; a missing SDK is one error line and tracing stays off."""
    global _enabled, _tracer, _provider, _propagator, _kinds, _status, _error, _in_context
    if exporter is None and env.get("LLM_GATEWAY_TRACING", "off").strip().lower() not in ("on", "true", "1", "otlp"):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
    except ImportError as exc:
        log.error("LLM_GATEWAY_TRACING is on but OpenTelemetry is not installed (%s): install "
                  "kong-llm-gateway[tracing]; tracing stays off", exc.name)
        return False
    from llm_gateway import PLUGIN_VERSION

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or "llm-gateway",
                                "service.version": PLUGIN_VERSION})
    _provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER, parent-based always-on by default
    _provider.add_span_processor(BatchSpanProcessor(exporter))
    _tracer = _provider.get_tracer("llm_gateway", PLUGIN_VERSION)
    _propagator = TraceContextTextMapPropagator()
    _kinds, _status, _error = trace.SpanKind, trace.Status, trace.StatusCode.ERROR
    _in_context = trace.set_span_in_context
    _enabled = True
    log.info("tracing on: spans exported over OTLP (%s)", type(exporter).__name__)
    return True


def shutdown() -> None:
    """Export what is still buffered (at the end of ``serve``)."""
    global _enabled
    if _provider is not None:
        _enabled = False
        try:
            _provider.shutdown()
        except Exception as exc:
            log.warning("flushing traces failed: %s", type(exc).__name__)


# -- hooks (each one line at its call site; nothing when off) --------------------------------------------------
def start_request(headers: Mapping[str, str], request_id: str) -> None:
    """The request span, child of the caller's ``traceparent`` when there is one."""
    if not _enabled:
        return
    try:
        _start_request(headers, request_id)
    except Exception:  # a tracing bug must never fail the request
        _failed("start_request")


def _start_request(headers: Mapping[str, str], request_id: str) -> None:
    parent = _propagator.extract({"traceparent": headers.get("traceparent", ""),
                                  "tracestate": headers.get("tracestate", "")}) if "traceparent" in headers else None
    span = _tracer.start_span("chat", context=parent, kind=_kinds.SERVER, attributes={
        "gen_ai.operation.name": "chat", "kong.request_id": request_id})
    _current.set(_Trace(span))


def attempt(alias: str, deployment: Any) -> None:
    """A provider attempt begins (retries and fallbacks are events on the request span too)."""
    if not _enabled:
        return
    try:
        _attempt(alias, deployment)
    except Exception:  # a tracing bug must never fail the request
        _failed("attempt")


def _attempt(alias: str, deployment: Any) -> None:
    trace = _current.get()
    if trace is None:
        return
    _end_attempt(trace, trace.attempt_error or "superseded")
    trace.attempts += 1
    provider, _, model = deployment.model.partition("/")
    what = {"llm_gateway.alias": alias, "llm_gateway.deployment": deployment.id or "", "gen_ai.system": provider,
            "gen_ai.request.model": model, "llm_gateway.attempt": trace.attempts}
    if trace.attempts > 1:
        event = "llm_gateway.fallback" if alias != trace.alias else "llm_gateway.retry"
        trace.span.add_event(event, {**what, "llm_gateway.previous_error": trace.attempt_error or ""})
    trace.alias = alias
    trace.attempt_error = None
    trace.attempt = _tracer.start_span(f"chat {model}", context=_in_context(trace.span), kind=_kinds.CLIENT,
                                       attributes={"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
                                                   **what})


def _failed(hook: str) -> None:
    log.warning("tracing: %s failed; the request goes on", hook, exc_info=log.isEnabledFor(logging.DEBUG))


def traced_call(call: Callable[[Any], Awaitable[T]]) -> Callable[[Any], Awaitable[T]]:
    """The router's call, ending each attempt span with its outcome; the call itself when tracing is off."""
    if not _enabled:
        return call

    async def traced(deployment: Any) -> T:
        try:
            result = await call(deployment)
        except BaseException as exc:
            _attempt_ended(getattr(exc, "code", None) or type(exc).__name__, getattr(exc, "status", None))
            raise
        _attempt_ended(None, None)
        return result

    return traced


def _attempt_ended(error: str | None, status: int | None) -> None:
    try:
        trace = _current.get()
        if trace is not None:
            trace.attempt_error = error
            _end_attempt(trace, error, status)
    except Exception:
        _failed("attempt end")


def _end_attempt(trace: _Trace, error: str | None, status: int | None = None) -> None:
    span, trace.attempt = trace.attempt, None
    if span is None:
        return
    if error is not None:
        span.set_attribute("error.type", error)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        span.set_status(_status(_error, error))
    span.end()


def finish_request(record: Any, params: Mapping[str, Any], usage: Any = None) -> None:
    """What the request came to: the ledger's usage record, the client's parameters (not its messages), and the
    finish reasons the provider gave (``openai_compatible.Usage``)."""
    if not _enabled:
        return
    try:
        _finish_request(record, params, usage)
    except Exception:  # a tracing bug must never fail the request
        _failed("finish_request")


def _finish_request(record: Any, params: Mapping[str, Any], usage: Any = None) -> None:
    trace = _current.get()
    if trace is None:
        return
    span = trace.span
    attributes: dict[str, Any] = {
        "gen_ai.request.model": record.alias, "gen_ai.response.model": record.model or "",
        "gen_ai.system": record.provider, "gen_ai.provider.name": record.provider,
        "llm_gateway.alias": record.alias, "llm_gateway.deployment": record.deployment or "",
        "llm_gateway.consumer": record.consumer or record.consumer_id or "",
        "llm_gateway.attempts": record.attempts, "llm_gateway.stream": record.stream,
        "http.response.status_code": record.status,
    }
    span.update_name(f"chat {record.alias}")
    if record.route:
        attributes["llm_gateway.route"] = record.route
    if record.fallback:
        attributes["llm_gateway.fallback"] = record.fallback
    if record.usage is not None:
        attributes.update({"gen_ai.usage.input_tokens": record.usage.prompt,
                           "gen_ai.usage.output_tokens": record.usage.completion,
                           "llm_gateway.usage.estimated": record.usage.estimated})
    if record.cost_usd is not None:
        attributes["llm_gateway.cost_usd"] = record.cost_usd
    if record.ttft_ms is not None:
        attributes["llm_gateway.ttft_ms"] = record.ttft_ms
    for name in ("max_tokens", "temperature", "top_p"):
        value = params.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attributes[f"gen_ai.request.{name}"] = value
    reasons = getattr(usage, "finish_reasons", None)
    if reasons:
        attributes["gen_ai.response.finish_reasons"] = list(dict.fromkeys(reasons))
    span.set_attributes(attributes)
    if record.error_code:
        span.set_attribute("error.type", record.error_code)
    if record.status >= 500:
        span.set_status(_status(_error, record.error_code or str(record.status)))


def end_request(status: int, error_code: str | None = None) -> None:
    """The request span ends (once), with the status the client got."""
    if not _enabled:
        return
    try:
        _end_request(status, error_code)
    except Exception:  # a tracing bug must never fail the request
        _failed("end_request")


def _end_request(status: int, error_code: str | None = None) -> None:
    trace = _current.get()
    if trace is None or trace.ended:
        return
    trace.ended = True
    _end_attempt(trace, trace.attempt_error or "abandoned")
    span = trace.span
    span.set_attribute("http.response.status_code", status)
    if error_code and status >= 400:
        span.set_attribute("error.type", error_code)
    if status >= 500:
        span.set_status(_status(_error, error_code or str(status)))
    span.end()
    _current.set(None)
