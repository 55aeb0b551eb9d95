"""Prometheus metrics of the gateway: requests, tokens, cost, latencies, budget rejections, fallbacks, cooldowns.

Labels never carry secrets: ``consumer`` is the Kong consumer's username (or its id), never a credential;
every label value is sanitised (control characters replaced, URL credentials removed, at most 128 characters).

Cardinality. The series count is roughly consumers × aliases × models × statuses for the requests counter
(and × 4 kinds for tokens). Aliases and providers come from the configuration and statuses are a handful of
codes, so consumers and models are the labels that can grow: each ``Metrics`` keeps at most ``max_consumers``
distinct consumer values and ``max_models`` distinct model values (per process) and reports any further one as
``__other__`` (the usage records keep every value). Histograms carry no consumer or model label.

Several plugin-server processes: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory, writable by every
process, **before** any process imports ``prometheus_client`` (it picks its storage at import). Every process
then writes its values to mmap files there, and ``start_metrics_server`` in any of them serves the sum over all
of them (``prometheus_client.multiprocess.MultiProcessCollector``). Empty the directory when the whole group
(re)starts, not when one process restarts: counters of exited processes stay part of the sum, as they should.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, values

if TYPE_CHECKING:  # accounting imports LiteLLM: this module is imported before it, to serve health early
    from llm_gateway.accounting.records import UsageRecord
    from llm_gateway.operations.health import Health

log = logging.getLogger("llm_gateway.metrics")

LABEL_MAX = 128
OTHER = "__other__"
ANONYMOUS = "anonymous"
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, float("inf"))
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, float("inf"))
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, float("inf"))
TOKEN_KINDS = ("prompt", "completion", "cached", "reasoning")


def label_value(value: Any) -> str:
    """A safe label value: a string without control characters or URL credentials, at most LABEL_MAX long."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if "://" in text:
        text = _URL_CREDENTIALS.sub("", text)
    if not text.isprintable():
        text = _UNPRINTABLE.sub("_", text)
    return text[:LABEL_MAX]


class _Capped:
    """At most ``limit`` distinct values of one label; any further value becomes ``__other__``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: Any) -> str:
        text = label_value(value)
        if text in self.seen:
            return text
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(text)
        return text


def multiprocess_enabled() -> bool:
    """True when PROMETHEUS_MULTIPROC_DIR is set (values of every process are aggregated at scrape)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


class Metrics:
    """The gateway's metrics. ``self.registry`` is what ``/metrics`` serves: the given registry or a fresh one (never
    the global one) holding these metrics; in multiprocess mode, that registry instead collects every process's
    values from ``PROMETHEUS_MULTIPROC_DIR`` (a MultiProcessCollector is added to it; the metrics themselves are
    registered nowhere, their values live in that directory's files)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, max_consumers: int = 1000,
                 max_models: int = 200) -> None:
        self.multiprocess = multiprocess_enabled()
        if self.multiprocess and not getattr(values.ValueClass, "_multiprocess", False):
            log.warning("PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported: this process's "
                        "metrics are not shared with the others")
        own: CollectorRegistry | None
        if self.multiprocess:  # values live in the mmap files; /metrics collects every process's files
            own = None
            self.registry = registry if registry is not None else CollectorRegistry()
        else:
            own = self.registry = registry if registry is not None else CollectorRegistry()
        self._consumer = _Capped(max_consumers)
        self._model = _Capped(max_models)
        by_model = ["consumer", "alias", "provider", "model"]
        self.requests = Counter("llm_gateway_requests", "LLM requests answered, by final HTTP status.",
                                [*by_model, "status"], registry=own)
        self.tokens = Counter("llm_gateway_tokens", "Tokens used (cached is part of prompt, reasoning part of "
                              "completion).", [*by_model, "kind"], registry=own)
        self.cost = Counter("llm_gateway_cost_usd", "Cost in USD at the configured or LiteLLM prices.", by_model,
                            registry=own)
        self.duration = Histogram("llm_gateway_request_duration_seconds", "Time from the request reaching the "
                                  "listener to its last byte.", ["alias", "provider", "stream"],
                                  buckets=DURATION_BUCKETS, registry=own)
        self.ttft = Histogram("llm_gateway_time_to_first_token_seconds", "Streams: time from the request reaching "
                              "the listener to the first event sent.", ["alias", "provider"], buckets=TTFT_BUCKETS,
                              registry=own)
        self.overhead = Histogram("llm_gateway_overhead_seconds", "Gateway time outside the provider call.",
                                  ["alias", "provider"], buckets=OVERHEAD_BUCKETS, registry=own)
        self.estimated = Counter("llm_gateway_estimated_usage", "Requests whose usage the provider did not report "
                                 "and the gateway estimated.", ["alias", "provider"], registry=own)
        self.truncated = Counter("llm_gateway_truncated_streams", "Streams that did not end with [DONE] (provider "
                                 "failure or client gone).", ["alias", "provider"], registry=own)
        self.budget_rejections = Counter("llm_gateway_budget_rejections", "Requests refused by a budget.",
                                         ["consumer", "budget"], registry=own)
        self.fallbacks = Counter("llm_gateway_fallbacks", "Requests moved to another provider.",
                                 ["alias", "from_provider", "to_provider"], registry=own)
        self.cooldowns = Counter("llm_gateway_cooldowns", "Deployments put in cooldown.", ["alias", "deployment"],
                                 registry=own)
        self.process_restarts = Counter("llm_gateway_process_restarts", "Worker processes of the plugin server "
                                        "restarted after they died (kong/workers.py).", registry=own)
        if self.multiprocess:
            from prometheus_client import multiprocess

            self.registry.register(_EveryFamily(multiprocess.MultiProcessCollector(None), [
                self.requests, self.tokens, self.cost, self.duration, self.ttft, self.overhead, self.estimated,
                self.truncated, self.budget_rejections, self.fallbacks, self.cooldowns, self.process_restarts]))

    def observe(self, record: UsageRecord, overhead_s: float | None = None) -> None:
        """Count one finished request (never raises)."""
        try:
            self._observe(record, overhead_s)
        except Exception:
            log.exception("metrics for request %s failed", record.request_id)

    def _observe(self, record: UsageRecord, overhead_s: float | None) -> None:
        consumer = self._consumer(record.consumer or ANONYMOUS)
        alias, provider = label_value(record.alias), label_value(record.provider)
        model = self._model(record.model)
        self.requests.labels(consumer, alias, provider, model, str(record.status)).inc()
        usage = record.usage
        if usage is not None:
            for kind, count in zip(TOKEN_KINDS, (usage.prompt, usage.completion, usage.cached, usage.reasoning),
                                   strict=True):
                self.tokens.labels(consumer, alias, provider, model, kind).inc(max(0, count))
            if usage.estimated:
                self.estimated.labels(alias, provider).inc()
        if record.cost_usd is not None and math.isfinite(record.cost_usd) and record.cost_usd >= 0:
            self.cost.labels(consumer, alias, provider, model).inc(record.cost_usd)
        if record.latency_ms is not None and record.latency_ms >= 0:
            self.duration.labels(alias, provider, "true" if record.stream else "false").observe(
                record.latency_ms / 1000)
        if record.ttft_ms is not None and record.ttft_ms >= 0:
            self.ttft.labels(alias, provider).observe(record.ttft_ms / 1000)
        if overhead_s is not None and overhead_s >= 0:
            self.overhead.labels(alias, provider).observe(overhead_s)
        if record.truncated:
            self.truncated.labels(alias, provider).inc()

    def answered(self, status: int, *, consumer: str | None = None, alias: str = "") -> None:
        """Count an answer no usage record describes (refused before any accounting began: a request without a
        valid ticket, a malformed or oversized body, an unknown model, a route or method that does not exist):
        ``requests`` then counts every answer the listener gave. ``consumer`` is None when no ticket vouched for
        one, ``alias`` the route's alias if the request named one that exists, else "" (a client-chosen model
        name never becomes a label). Never raises."""
        try:
            who = "" if consumer is None else self._consumer(consumer or ANONYMOUS)
            self.requests.labels(who, label_value(alias), "", "", str(status)).inc()
        except Exception:
            log.exception("metrics for an answer with status %s failed", status)

    def budget_rejected(self, consumer: str, budget: str) -> None:
        self.budget_rejections.labels(self._consumer(consumer or ANONYMOUS), label_value(budget)).inc()

    def fallback(self, alias: str, from_provider: str, to_provider: str) -> None:
        self.fallbacks.labels(label_value(alias), label_value(from_provider), label_value(to_provider)).inc()

    def cooldown(self, alias: str, deployment: str) -> None:
        self.cooldowns.labels(label_value(alias), label_value(deployment)).inc()

    def process_restarted(self) -> None:
        self.process_restarts.inc()


class _EveryFamily:
    """Every process's values (multiprocess mode), and the families no process has a sample of yet with their
    HELP and TYPE lines, as a single process serves them: a scrape (or a dashboard) knows every metric from the
    start, not only those that have counted something."""

    def __init__(self, collector: Any, metrics: list[Any]) -> None:
        self.collector = collector
        self.metrics = metrics

    def collect(self) -> Any:
        families = list(self.collector.collect())
        seen = {family.name for family in families}
        yield from families
        for metric in self.metrics:
            for family in metric.describe():
                if family.name not in seen:
                    yield family


def start_metrics_server(host: str, port: int, metrics: Metrics, health: Health | None = None) -> Any:
    """Serve ``metrics.registry`` (so, in multiprocess mode, the sum over every process) as Prometheus text on
    ``http://host:port/metrics``, and, given ``health``, liveness and readiness (``operations/health.py``) beside
    it, from a threaded WSGI server (prometheus_client's) in a daemon thread.

    A thread rather than a route on the asyncio loop: a scrape (rendering, and in multiprocess mode reading and
    merging every process's files) never runs inside a request's turn of the event loop, /metrics still
    answers when the loop is stuck, which is when it matters, and health answers while the loop is still busy
    importing LiteLLM. Binding happens here, so a taken port raises OSError to the caller. Returns the WSGI
    server (``shutdown()`` stops it)."""
    from wsgiref.simple_server import make_server

    from prometheus_client import exposition

    prometheus = exposition.make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        answer = health.answer(environ.get("PATH_INFO", "")) if health is not None else None
        if answer is None:
            return prometheus(environ, start_response)
        status, body = answer
        start_response("200 OK" if status == 200 else f"{status} Service Unavailable",
                       [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                        ("Content-Length", str(len(body)))])
        return [body]

    class Server(exposition.ThreadingWSGIServer):
        pass

    Server.address_family, addr = exposition._get_best_family(host, port)
    server = make_server(addr, port, app, Server, handler_class=exposition._SilentHandler)
    resume_metrics_server(server)
    return server


def pause_metrics_server(server: Any, wait_s: float = 5.0) -> None:
    """Stop serving (the socket stays bound: scrapes wait in its backlog) and wait until no thread of it runs:
    the master forks its zygote in this moment (kong/workers.py), and a fork must not copy a thread that holds a
    lock. Threads of anything else are reported, not waited for."""
    import threading

    server.shutdown()
    deadline = time.monotonic() + wait_s
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.001)  # a scrape or health answer under way finishes in milliseconds
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        log.warning("threads still running at fork: %s", ", ".join(others))


def resume_metrics_server(server: Any) -> None:
    import threading

    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
