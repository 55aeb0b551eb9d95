"""One request's accounting: budget admission before the provider is called, then, however the response
ended (complete, failed, cut by the provider or abandoned by the client), usage, cost, settlement, one usage
record and the metrics. A request that was charged upstream is always accounted.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from llm_gateway import accounting, tracing
from llm_gateway.accounting import TokenUsage, UsageRecord
from llm_gateway.budgets import BudgetExceeded, BudgetUnavailable, Headroom, Reservation
from llm_gateway.chat_request import ChatRequest
from llm_gateway.config import Deployment, GatewayConfig
from llm_gateway.errors import GatewayError
from llm_gateway.openai_compatible import Usage
from llm_gateway.providers import Target
from llm_gateway.runtime import Runtime

log = logging.getLogger("llm_gateway.ledger")


def _headroom_headers(headroom: Headroom | None) -> dict[str, str]:
    if headroom is None or headroom.limit_tokens is None:
        return {}
    return {"X-RateLimit-Limit-Tokens": str(headroom.limit_tokens),
            "X-RateLimit-Remaining-Tokens": str(max(0, headroom.remaining_tokens or 0))}


class Ledger:
    def __init__(self, runtime: Runtime, config: GatewayConfig, *, request_id: str, consumer: str | None,
                 consumer_id: str | None, chat: ChatRequest, deployment: Deployment, target: Target,
                 started: float) -> None:
        self.runtime, self.config, self.chat, self.deployment, self.target = runtime, config, chat, deployment, target
        self.request_id, self.consumer, self.consumer_id, self.started = request_id, consumer, consumer_id, started
        self.usage = Usage(decorate=self._decorate_usage)
        self.prices = accounting.prices_for(deployment.model, deployment.price)
        self.attempts = 0
        self.serving_alias: str | None = None  # set when a fallback alias served
        self.complexity: tuple[float, str] | None = None  # (score, chosen alias) for a routing alias
        self.reservation: Reservation | None = None
        self.headroom: Headroom | None = None
        self.provider_started: float | None = None
        self.first_byte: float | None = None
        self._finished = False
        self._tokens: TokenUsage | None = None

    # -- before the provider call --------------------------------------------------------------------------
    async def admit(self) -> dict[str, str]:
        """Reserve an estimate against the consumer's budgets; GatewayError 429/503 when it cannot be admitted."""
        budgets = [b for b in self.config.budgets if b.applies_to(self.consumer, self.consumer_id)]
        if budgets:
            prompt = accounting.estimate_prompt_tokens(self.target.model, self.chat.params["messages"])
            completion = (self.chat.params.get("max_completion_tokens") or self.chat.params.get("max_tokens")
                          or self.config.budget_reservation_tokens)
            estimate = TokenUsage(prompt=prompt, completion=completion, total=prompt + completion, cached=0,
                                  reasoning=0, estimated=True)
            usd = accounting.cost_usd(estimate, self.prices) or 0.0
            store = self.runtime.budget_store(self.config)
            try:
                self.reservation, self.headroom = await store.reserve(self.consumer or self.consumer_id or "", budgets,
                                                                      estimate.total, usd)
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
        self.provider_started = time.monotonic()
        return _headroom_headers(self.headroom)

    def attempt(self, deployment: Deployment, target: Target) -> None:
        """A new try upstream (retry or fallback): usage is what the deployment that answers reports."""
        self.attempts += 1
        if deployment.model != self.deployment.model or deployment.price != self.deployment.price:
            self.prices = accounting.prices_for(deployment.model, deployment.price)
        self.deployment, self.target = deployment, target
        self.usage = Usage(decorate=self._decorate_usage)

    # -- after the provider call ----------------------------------------------------------------------------
    def _token_usage(self) -> TokenUsage | None:
        reported = accounting.from_provider_usage(self.usage.usage)
        if reported is not None:
            return reported
        if self.provider_started is None or not (self.usage.text or self.first_byte):
            return None  # nothing reached the provider, or it answered nothing: nothing to charge
        return accounting.estimate_usage(self.target.model, self.chat.params["messages"], "".join(self.usage.text))

    @property
    def total_tokens(self) -> int:
        """What the request used, once finished: feeds the deployment's tokens-per-minute count."""
        return self._tokens.total if self._tokens else 0

    def _decorate_usage(self, usage: dict[str, Any]) -> None:
        """Streams carry the cost in the final usage chunk, when the client asked for usage."""
        tokens = accounting.from_provider_usage(usage)
        cost = accounting.cost_usd(tokens, self.prices) if tokens else None
        if cost is not None:
            usage["cost_usd"] = round(cost, 10)

    async def finish(self, status: int, *, error_code: str | None = None, truncated: bool = False) -> dict[str, str]:
        """Settle, record and observe, once; returns the usage headers for a JSON response."""
        if self._finished:
            return {}
        self._finished = True
        now = time.monotonic()
        tokens = self._tokens = self._token_usage()
        cost = accounting.cost_usd(tokens, self.prices) if tokens else None
        if self.reservation is not None:
            store = self.runtime.budget_store(self.config)
            try:
                if tokens is None:
                    await store.release(self.reservation)
                else:
                    self.headroom = await store.settle(self.reservation, tokens.total, cost or 0.0)
            except Exception:  # the record below still says what was used
                log.warning("budget settlement failed for request %s", self.request_id)
        record = UsageRecord(
            request_id=self.request_id, consumer=self.consumer, consumer_id=self.consumer_id,
            route=self.config.route_id, alias=self.chat.model, provider=self.target.provider,
            model=self.usage.model or self.target.model,
            stream=self.chat.stream, status=status, error_code=error_code, usage=tokens, cost_usd=cost,
            latency_ms=(now - self.started) * 1000,
            ttft_ms=(self.first_byte - self.started) * 1000 if self.first_byte else None, truncated=truncated,
            cache_status=accounting.cache_status(tokens), attempts=max(1, self.attempts),
            deployment=self.deployment.id or None, fallback=self.serving_alias,
            complexity_score=self.complexity[0] if self.complexity else None,
            complexity_choice=self.complexity[1] if self.complexity else None)
        self.runtime.record_sink(self.config).emit(record)
        tracing.finish_request(record, self.chat.params, self.usage)  # nothing when tracing is off
        overhead = (self.provider_started - self.started) if self.provider_started else None
        self.runtime.metrics.observe(record, overhead_s=overhead)
        headers = _headroom_headers(self.headroom)
        if tokens is not None and not self.chat.stream:
            headers.update({"X-LLM-Prompt-Tokens": str(tokens.prompt),
                            "X-LLM-Completion-Tokens": str(tokens.completion),
                            "X-LLM-Total-Tokens": str(tokens.total)})
            if tokens.estimated:
                headers["X-LLM-Usage-Estimated"] = "true"
            if cost is not None:
                headers["X-LLM-Cost-USD"] = f"{cost:.8f}"
        return headers
