"""Where a request goes: the alias's deployments in the order its strategy gives, retries with backoff on
transient errors, then fallback aliases, all within one deadline; cooldowns and in-flight counts in a
``RoutingState`` that several Kong nodes can share.

The router only decides and repeats; the call itself is the caller's (``providers.complete`` or
``providers.open_stream``), so for streams every retry and fallback happens before the first byte reaches the
client: ``open_stream`` returns only once the provider's first event is in hand.

Why our own and not LiteLLM's ``Router``: it drives ``litellm.acompletion`` (5–9 ms of CPU per call here),
while this path relays provider bytes; its per-request cost is measured against ours in
``bench/routing_overhead.py`` (docs/routing.md). Our kong.yml schema stays the contract either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from llm_gateway.config import Alias, Deployment, GatewayConfig, RoutingSettings
from llm_gateway.errors import GatewayError
from llm_gateway.routing import strategies
from llm_gateway.routing.state import RoutingState, Snapshot

T = TypeVar("T")

# What an error code says about the next step (codes from errors.py)
TRANSIENT = frozenset({"rate_limit_exceeded", "provider_timeout", "provider_error"})
DEPLOYMENT_FAULT = frozenset({"provider_auth_error", "provider_model_not_found"})  # this deployment never will
CONTEXT_WINDOW = "context_length_exceeded"
CONTENT_POLICY = "content_policy_violation"
IN_FLIGHT_GRACE_S = 30.0  # an in-flight mark outlives its call's timeout by this much if the node dies
# strategies that read requests in flight: their snapshots are read fresh; the others need only cooldowns
COUNTED_STRATEGIES = frozenset({"least-busy", "latency"})


@dataclass
class Routed(Generic[T]):
    """A successful call and how it came about; ``done`` must be awaited when the answer is over."""

    result: T
    alias: Alias
    deployment: Deployment
    attempts: int
    fallback: str | None  # the alias that served, when it is not the requested one
    done: Callable[[int], Awaitable[None]]  # tokens used: ends the in-flight mark, feeds tpm caps


def _candidates(deployments: tuple[Deployment, ...],
                prices: Mapping[str, float | None]) -> list[strategies.Candidate]:
    return [strategies.Candidate(id=d.health_key, position=i, weight=d.weight, price=prices.get(d.id))
            for i, d in enumerate(deployments)]


def _available(alias: Alias, snap: Snapshot, excluded: set[str]) -> list[Deployment]:
    out = []
    for d in alias.deployments:
        key = d.health_key
        if d.id in excluded or key in snap.cooling:
            continue
        if d.rpm is not None and snap.minute_requests.get(key, 0) >= d.rpm:
            continue
        if d.tpm is not None and snap.minute_tokens.get(key, 0) >= d.tpm:
            continue
        out.append(d)
    return out


def _retry_after(err: GatewayError) -> float | None:
    try:
        return float(err.headers["Retry-After"]) if "Retry-After" in err.headers else None
    except ValueError:
        return None


def _unavailable(until: float | None, now: float) -> GatewayError:
    seconds = max(1, math.ceil(until - now)) if until else 60 - int(now) % 60  # capped: next minute
    return GatewayError(503, "Every deployment of this model is cooling down or at capacity; retry later.",
                        type="server_error", code="no_healthy_deployment", headers={"Retry-After": str(seconds)})


class Router:
    """One per process: the shared state, this node's latency averages and prices, a random source."""

    def __init__(self, state_for: Callable[[GatewayConfig], RoutingState],
                 on_cooldown: Callable[[str, str], None] | None = None, rng: random.Random | None = None,
                 deadline_for: Callable[[GatewayConfig], float] | None = None) -> None:
        self._state_for = state_for
        self._deadline_for = deadline_for or (lambda config: config.routing.deadline)
        self._on_cooldown = on_cooldown or (lambda alias, deployment: None)
        self.latency = strategies.LatencyTracker()
        self._rng = rng or random.Random()
        self._prices: dict[str, dict[str, float | None]] = {}

    def _price_table(self, alias: Alias) -> Mapping[str, float | None]:
        if alias.strategy != "cost":
            return {}
        key = repr([(alias.name, d.id, d.model, d.price) for d in alias.deployments])
        if key not in self._prices:
            self._prices[key] = {d.id: strategies.blended_price(d.model, d.price) for d in alias.deployments}
        return self._prices[key]

    async def route(self, config: GatewayConfig, alias: Alias, request_id: str,
                    call: Callable[[Deployment], Awaitable[T]],
                    on_attempt: Callable[[Alias, Deployment], None]) -> Routed[T]:
        """Try ``alias``, then its fallbacks (context-window and content-policy refusals have their own),
        until one answers or the deadline passes. Raises the last error the client should see."""
        run = _Run(self, config, request_id, call, on_attempt)
        queue, seen = [alias], set()
        while queue:
            current = queue.pop(0)
            if current.name in seen:
                continue
            seen.add(current.name)
            routed = await run.alias(current)
            if routed is not None:
                routed.fallback = current.name if current.name != alias.name else None
                return routed
            err = run.last_error
            if err is not None and err.code == CONTEXT_WINDOW:
                names = current.context_window_fallbacks
            elif err is not None and err.code == CONTENT_POLICY:
                names = current.content_policy_fallbacks
            elif err is not None and not run.retryable(err):
                raise err  # the request itself is wrong: another model would refuse it too
            else:
                names = current.fallbacks
            queue.extend(config.models[n] for n in names if n in config.models)
        if run.last_error is not None:
            raise run.last_error
        raise _unavailable(run.next_available, time.time())


class _Run(Generic[T]):
    """The state of one request's routing: attempts, deadline, the last error seen."""

    def __init__(self, router: Router, config: GatewayConfig, request_id: str,
                 call: Callable[[Deployment], Awaitable[T]], on_attempt: Callable[[Alias, Deployment], None]) -> None:
        self.router, self.config, self.request_id = router, config, request_id
        self.call, self.on_attempt = call, on_attempt
        self.settings: RoutingSettings = config.routing
        self.state = router._state_for(config)
        self.deadline = time.monotonic() + router._deadline_for(config)
        self.attempts = 0
        self.last_error: GatewayError | None = None
        self.next_available: float | None = None  # earliest end of a cooldown that stopped us

    @staticmethod
    def retryable(err: GatewayError) -> bool:
        return err.code in TRANSIENT or err.code in DEPLOYMENT_FAULT

    def _backoff(self, retry: int) -> float:
        """Exponential with full jitter (AWS's advice): retries from many clients do not synchronise."""
        ceiling = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** retry)
        return self.router._rng.uniform(ceiling / 2, ceiling)

    async def alias(self, alias: Alias) -> Routed[T] | None:
        keys = list(dict.fromkeys(d.health_key for d in alias.deployments))
        tried: dict[str, int] = {}
        excluded: set[str] = set()
        prices = self.router._price_table(alias)
        reuses = 0  # every deployment is tried once; `retries` more attempts may go to one already tried
        counts = alias.strategy in COUNTED_STRATEGIES or any(d.rpm or d.tpm for d in alias.deployments)
        for _ in range(len(alias.deployments) + self.settings.retries):
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                break
            snap = await self.state.snapshot(keys, counts=counts)
            available = _available(alias, snap, excluded)
            if not available:
                ends = [snap.cooling[k] for k in keys if k in snap.cooling]
                if ends:
                    soonest = min(ends)
                    self.next_available = min(self.next_available or soonest, soonest)
                break
            ordered = strategies.order(alias.strategy, _candidates(tuple(available), prices),
                                       in_flight=snap.in_flight, latency=self.router.latency, rng=self.router._rng,
                                       latency_buffer=self.settings.latency_buffer)
            fresh = [c for c in ordered if available[c.position].id not in tried]
            pick = (fresh or ordered)[0]
            deployment = available[pick.position]
            if deployment.id in tried:  # the same place again: give it time, as long as it asked for
                delay = self._backoff(reuses)
                reuses += 1
                asked = _retry_after(self.last_error) if self.last_error else None
                if asked is not None:  # never sooner than the provider asked; longer than backoff_max is
                    if asked > self.settings.backoff_max:  # the client's wait to choose (429 + Retry-After)
                        break
                    delay = max(delay, asked)
                if delay >= remaining:
                    break
                await asyncio.sleep(delay)
                remaining = self.deadline - time.monotonic()
            tried[deployment.id] = tried.get(deployment.id, 0) + 1
            routed = await self._attempt(alias, deployment, keys, remaining)
            if routed is not None:
                return routed
            assert self.last_error is not None
            if not self.retryable(self.last_error):
                return None
            if self.last_error.code in DEPLOYMENT_FAULT:
                excluded.add(deployment.id)
        return None

    async def _attempt(self, alias: Alias, deployment: Deployment, group: list[str],
                       remaining: float) -> Routed[T] | None:
        self.attempts += 1
        self.on_attempt(alias, deployment)
        if deployment.timeout > remaining:
            deployment = dataclasses.replace(deployment, timeout=remaining)
        key = deployment.health_key
        # in-flight and per-minute counts cost two shared-state round trips: kept only where they decide
        track = alias.strategy == "least-busy" or any(d.rpm or d.tpm for d in alias.deployments)
        if track:
            await self.state.begin(key, self.request_id, deployment.timeout + IN_FLIGHT_GRACE_S)
        started = time.monotonic()
        try:
            result = await self.call(deployment)
        except GatewayError as err:
            self.last_error = err
            if track:
                await self.state.end(key, self.request_id, 0)
            if err.code in TRANSIENT or err.code in DEPLOYMENT_FAULT:
                cooled = await self.state.failure(
                    key, group, self.settings.cooldown, rate_limited=err.code == "rate_limit_exceeded",
                    retry_after=_retry_after(err))
                if cooled is not None:
                    self.router._on_cooldown(alias.name, deployment.id)
            return None
        except BaseException:
            if track:
                await self.state.end(key, self.request_id, 0)
            raise
        self.router.latency.observe(key, time.monotonic() - started)

        async def done(tokens: int) -> None:
            if track:
                await self.state.end(key, self.request_id, tokens)

        return Routed(result=result, alias=alias, deployment=deployment, attempts=self.attempts, fallback=None,
                      done=done)
