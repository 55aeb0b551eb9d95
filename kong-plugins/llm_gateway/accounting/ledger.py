"""One request's accounting: budget admission before the provider is called, then, however the response
ended (complete, failed, cut by the provider or abandoned by the client), usage, cost, settlement, one usage
record and the metrics. A request that was charged upstream is always accounted.

Admission bounds what one request may spend: when budgets apply, the reservation is capped to what the
tightest budget has left (at least ``limits.min_completion_tokens`` after the prompt, else 429), the
provider is sent a ``max_tokens`` no larger than what was reserved (``X-LLM-Max-Tokens-Capped`` says so), and
a stream that runs past it anyway is ended by its ``StreamGuard``. With Redis, the reservation holds a lease
that ends when the request must be over (see accounting/budgets.py): a node that dies mid-request gives its
reservations back when their leases end, and its requests are recorded as lost.

``finish`` never raises: every step is guarded, and the record and the metrics are written whatever failed
before them (a request the response path could not account for would be a request nobody pays for).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from llm_gateway.accounting.budgets import BudgetExceeded, BudgetUnavailable, Headroom, Lease, Reservation
from llm_gateway.accounting.prices import cost_usd, prices_for
from llm_gateway.accounting.records import UsageRecord, cache_status, record_line
from llm_gateway.accounting.tokens import (
    TokenUsage,
    estimate_completion_tokens,
    from_provider_usage,
    rough_tokens,
)
from llm_gateway.api.base import ApiRequest
from llm_gateway.config import Deployment, GatewayConfig
from llm_gateway.errors import GatewayError
from llm_gateway.operations import tracing
from llm_gateway.providers.openai_compatible import Usage
from llm_gateway.providers.stream_limits import StreamGuard
from llm_gateway.providers.upstream import Target
from llm_gateway.runtime import Runtime

log = logging.getLogger("llm_gateway.ledger")

CAPPED_HEADER = "X-LLM-Max-Tokens-Capped"


def _headroom_headers(headroom: Headroom | None) -> dict[str, str]:
    if headroom is None or headroom.limit_tokens is None:
        return {}
    return {"X-RateLimit-Limit-Tokens": str(headroom.limit_tokens),
            "X-RateLimit-Remaining-Tokens": str(max(0, headroom.remaining_tokens or 0))}


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class Ledger:
    def __init__(self, runtime: Runtime, config: GatewayConfig, *, request_id: str, consumer: str | None,
                 consumer_id: str | None, request: ApiRequest, deployment: Deployment, target: Target,
                 started: float) -> None:
        self.runtime, self.config, self.request = runtime, config, request
        self.deployment, self.target = deployment, target
        self.request_id, self.consumer, self.consumer_id, self.started = request_id, consumer, consumer_id, started
        self.usage = Usage(decorate=self._decorate_usage)
        self.prices = prices_for(deployment.model, deployment.price)
        self.attempts = 0
        self.serving_alias: str | None = None  # set when a fallback alias served
        self.complexity: tuple[float, str] | None = None  # (score, chosen alias) for a routing alias
        self.client_request_id: str | None = None  # the client's own X-Request-ID, kept in the record
        self.reservation: Reservation | None = None
        self._journal: asyncio.Future[Reservation | None] | None = None  # the lease of a request without budget
        self.headroom: Headroom | None = None
        self.max_completion: int | None = None  # completion tokens the reservation granted (budgets only)
        self.provider_started: float | None = None
        self.first_byte: float | None = None
        self.answered = False  # a whole JSON answer came back: charged even if it reported no usage and had no text
        self._finished = False
        self._tokens: TokenUsage | None = None

    # -- before the provider call --------------------------------------------------------------------------
    def _lease(self, prompt: int) -> Lease:
        """What a sweeper needs to record this request as lost, should its node never settle it."""
        seconds = self.config.limits.lease_seconds(self.config.routing, self.request.stream)
        meta = {"request_id": self.request_id, "consumer": self.consumer, "consumer_id": self.consumer_id,
                "route": self.config.route_id, "alias": self.request.model, "endpoint": self.request.endpoint,
                "provider": self.target.provider,
                "model": self.target.model, "deployment": self.deployment.id or None, "stream": self.request.stream,
                "prompt": prompt, "admitted_at": round(time.time(), 3)}
        return Lease(self.request_id, time.time() + seconds, meta)

    def _cap(self, granted: int) -> dict[str, str]:
        """Send the provider no larger a completion limit than the reservation granted."""
        params, limit_keys = self.request.params, self.request.limit_keys
        if not limit_keys:  # nothing to cap (embeddings): the reservation is the prompt itself
            return {}
        asked = [key for key in limit_keys if _positive(params.get(key)) is not None]
        if asked and all(params[key] <= granted for key in asked):
            return {}
        for key in asked or limit_keys[:1]:
            params[key] = granted
        return {CAPPED_HEADER: str(granted)}

    async def admit(self) -> dict[str, str]:
        """Reserve an estimate against the consumer's budgets; GatewayError 429/503 when it cannot be admitted."""
        budgets = [b for b in self.config.budgets if b.applies_to(self.consumer, self.consumer_id)]
        headers: dict[str, str] = {}
        if budgets:
            prompt = self.request.prompt_tokens(self.target.model)
            asked = [_positive(self.request.params.get(key)) for key in self.request.limit_keys]
            completion = min((a for a in asked if a), default=self.config.budget_reservation_tokens) \
                if self.request.limit_keys else 0  # an endpoint with no completion (embeddings) reserves its prompt
            estimate = TokenUsage(prompt=prompt, completion=completion, total=prompt + completion, cached=0,
                                  reasoning=0, estimated=True)
            usd = cost_usd(estimate, self.prices) or 0.0
            per_token = self.prices.output_per_token if self.prices else 0.0
            store = self.runtime.budget_store(self.config)
            floor = prompt + min(completion, self.config.limits.min_completion_tokens)
            try:
                self.reservation, self.headroom = await store.reserve(
                    self.consumer or self.consumer_id or "", budgets, estimate.total, usd, min_tokens=floor,
                    usd_per_token=per_token, lease=self._lease(prompt))
            except BudgetExceeded as exc:
                self.runtime.metrics.budget_rejected(self.consumer or "", exc.budget.name)
                if exc.never_fits:
                    message = (f"This request reserves more than the whole {exc.budget.name} {exc.kind} budget of "
                               f"this consumer; lower max_tokens (or max_completion_tokens).")
                else:
                    message = (f"The {exc.budget.name} {exc.kind} budget of this consumer is exhausted until its "
                               f"{exc.budget.window} window resets.")
                err = GatewayError(429, message, type="rate_limit_error", code="budget_exceeded",
                                   headers={"Retry-After": str(exc.retry_after)})
                await self.finish(err.status, error_code=err.code)
                raise err from None
            except BudgetUnavailable:
                err = GatewayError(503, "Budgets cannot be checked right now; retry shortly.", type="server_error",
                                   code="budget_store_unavailable", headers={"Retry-After": "1"})
                await self.finish(err.status, error_code=err.code)
                raise err from None
            self.max_completion = max(1, self.reservation.tokens - prompt)
            headers.update(self._cap(self.max_completion))
        elif self.config.redis is not None:
            # no budget to charge, but a node that dies mid-request must still leave a trace of it: a lease
            # that reserves nothing, taken while the provider works (off the request's critical path)
            self._journal = asyncio.ensure_future(self._open_journal())
        self.provider_started = time.monotonic()
        return {**_headroom_headers(self.headroom), **headers}

    async def _open_journal(self) -> Reservation | None:
        try:
            store = self.runtime.budget_store(self.config)
            reservation, _ = await store.reserve(self.consumer or self.consumer_id or "", [], 0, 0.0,
                                                 lease=self._lease(0))
            return reservation
        except Exception as exc:  # never fails a request without budget: its record is still written
            log.debug("no lease for request %s (%s)", self.request_id, type(exc).__name__)
            return None

    def attempt(self, deployment: Deployment, target: Target) -> None:
        """A new try upstream (retry or fallback): usage is what the deployment that answers reports."""
        self.attempts += 1
        if deployment.model != self.deployment.model or deployment.price != self.deployment.price:
            self.prices = prices_for(deployment.model, deployment.price)
        self.deployment, self.target = deployment, target
        self.usage = Usage(decorate=self._decorate_usage)

    def guard(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The provider's events within this route's stream limits and this request's reservation."""
        limits = self.config.limits
        return StreamGuard(self.usage, started=self.started, max_duration_s=limits.stream_max_duration,
                           idle_s=self.runtime.stream_idle(self.config), max_tokens=self.max_completion,
                           completion_tokens=self._completion_tokens).guard(events)

    # -- after the provider call ----------------------------------------------------------------------------
    def _completion_tokens(self) -> int:
        """The completion so far, counted: the kept text exactly (bounded cost), the rest by its length."""
        usage = self.usage
        counted = estimate_completion_tokens(self.target.model, "".join(usage.text))
        return counted + rough_tokens(usage.chars - usage.kept)

    def _token_usage(self) -> TokenUsage | None:
        reported = from_provider_usage(self.usage.usage)
        if reported is not None:
            return reported
        if self.provider_started is None or not (self.usage.chars or self.first_byte or self.answered):
            return None  # nothing reached the provider, or it answered nothing: nothing to charge
        prompt = self.request.prompt_tokens(self.target.model)
        completion = self._completion_tokens()
        return TokenUsage(prompt=prompt, completion=completion, total=prompt + completion, cached=0, reasoning=0,
                          estimated=True)

    @property
    def total_tokens(self) -> int:
        """What the request used, once finished: feeds the deployment's tokens-per-minute count."""
        return self._tokens.total if self._tokens else 0

    def _decorate_usage(self, usage: dict[str, Any]) -> None:
        """Streams carry the cost in the final usage chunk, when the client asked for usage."""
        tokens = from_provider_usage(usage)
        cost = cost_usd(tokens, self.prices) if tokens else None
        if cost is not None:
            usage["cost_usd"] = round(cost, 10)

    def _record(self, status: int, error_code: str | None, truncated: bool, tokens: TokenUsage | None,
                cost: float | None, now: float) -> UsageRecord:
        return UsageRecord(
            request_id=self.request_id, consumer=self.consumer, consumer_id=self.consumer_id,
            route=self.config.route_id, alias=self.request.model, provider=self.target.provider,
            model=self.usage.model or self.target.model,
            stream=self.request.stream, status=status, error_code=error_code, usage=tokens, cost_usd=cost,
            latency_ms=(now - self.started) * 1000,
            ttft_ms=(self.first_byte - self.started) * 1000 if self.first_byte else None, truncated=truncated,
            cache_status=cache_status(tokens), attempts=max(1, self.attempts),
            deployment=self.deployment.id or None, fallback=self.serving_alias,
            complexity_score=self.complexity[0] if self.complexity else None,
            complexity_choice=self.complexity[1] if self.complexity else None,
            client_request_id=self.client_request_id, endpoint=self.request.endpoint)

    async def _settle(self, tokens: TokenUsage | None, cost: float | None, line: str | None) -> None:
        """Settle the reservation (the lease keeps the record until the stream has it). Never raises: the
        Redis store retries failed settlements itself, and a lease that never settles is swept."""
        if self.reservation is None and self._journal is not None:
            try:
                self.reservation = await self._journal
            except Exception:
                self.reservation = None
        if self.reservation is None:
            return
        store = self.runtime.budget_store(self.config)
        try:
            if tokens is None:
                await store.release(self.reservation, line)
            else:
                self.headroom = await store.settle(self.reservation, tokens.total, cost or 0.0, line)
        except Exception:  # the record below still says what was used
            log.warning("budget settlement failed for request %s", self.request_id)

    async def finish(self, status: int, *, error_code: str | None = None, truncated: bool = False) -> dict[str, str]:
        """Settle, record and observe, once; returns the usage headers for a JSON response. Never raises but
        CancelledError, and even then the accounting completes: it runs shielded, so a client that leaves (or a
        handler cancelled) mid-settlement is still billed and recorded."""
        if self._finished:
            return {}
        self._finished = True
        return await asyncio.shield(asyncio.ensure_future(self._finish(status, error_code, truncated)))

    async def _finish(self, status: int, error_code: str | None, truncated: bool) -> dict[str, str]:
        now = time.monotonic()
        tokens = cost = None
        try:
            tokens = self._tokens = self._token_usage()
            cost = cost_usd(tokens, self.prices) if tokens else None
        except Exception as exc:  # the record is written regardless: usage unknown is better than no record
            log.error("could not count the usage of request %s: %s", self.request_id, type(exc).__name__)
            log.debug("usage count failure of request %s", self.request_id, exc_info=True)
        record = self._record(status, error_code, truncated, tokens, cost, now)
        line = record_line(record)
        await self._settle(tokens, cost, line)
        try:
            sink = self.runtime.record_sink(self.config)
            if line is not None:
                store = self.runtime.budget_store(self.config) if self.reservation else None
                lease = self.reservation.lease if self.reservation else None
                sink.emit_line(record.request_id, line, lease=lease, forget=getattr(store, "forget", None))
        except Exception:
            log.exception("could not queue the usage record of request %s", self.request_id)
        try:
            overhead = (self.provider_started - self.started) if self.provider_started else None
            self.runtime.metrics.observe(record, overhead_s=overhead)
        except Exception:
            log.exception("could not observe the metrics of request %s", self.request_id)
        tracing.finish_request(record, self.request.params, self.usage)  # nothing when tracing is off; never raises
        headers = _headroom_headers(self.headroom)
        if tokens is not None and not self.request.stream:
            headers.update({"X-LLM-Prompt-Tokens": str(tokens.prompt),
                            "X-LLM-Completion-Tokens": str(tokens.completion),
                            "X-LLM-Total-Tokens": str(tokens.total)})
            if tokens.estimated:
                headers["X-LLM-Usage-Estimated"] = "true"
            if cost is not None:
                headers["X-LLM-Cost-USD"] = f"{cost:.8f}"
        return headers
