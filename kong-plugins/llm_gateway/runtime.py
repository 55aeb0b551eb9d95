"""Process-wide state shared by every plugin instance and the listener: configs, tickets, metrics, and the
clients of shared stores (one Redis client per URL, one budget store and one record sink per configuration of
them), created once and reused by every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from llm_gateway.accounting.budget_stores.memory import MemoryBudgetStore
from llm_gateway.accounting.budget_stores.redis import RedisBudgetStore
from llm_gateway.accounting.budgets import BudgetStore
from llm_gateway.accounting.metrics import Metrics
from llm_gateway.accounting.records import RecordSink
from llm_gateway.config import ConfigRegistry, GatewayConfig, RedisSettings
from llm_gateway.kong.ticket import TicketBook
from llm_gateway.routing.router import Router
from llm_gateway.routing.state import RoutingState
from llm_gateway.routing.state_stores.memory import MemoryRoutingState
from llm_gateway.routing.state_stores.redis import RedisRoutingState

log = logging.getLogger("llm_gateway.runtime")

# Kong's read timeout, less this, is how long the gateway may take before its answer (or error) starts.
KONG_TIMEOUT_MARGIN_S = 2.0

#: connections per Redis URL: one process's event loop never needs more in flight at once (a Redis command
#: takes well under a millisecond); more only costs Redis file descriptors on every node
POOL_CONNECTIONS = 128
#: how long a command may wait for a free connection before it counts as a Redis failure
POOL_WAIT_S = 2.0


@dataclass
class Runtime:
    registry: ConfigRegistry
    tickets: TicketBook
    metrics: Metrics = field(default_factory=Metrics)
    _redis: dict[str, Any] = field(default_factory=dict)
    _stores: dict[tuple, BudgetStore] = field(default_factory=dict)
    _sinks: dict[tuple, RecordSink] = field(default_factory=dict)
    _routing: dict[tuple, RoutingState] = field(default_factory=dict)
    _kong_read_timeouts: dict[str, float] = field(default_factory=dict)
    _sweepers: dict[tuple, asyncio.Task] = field(default_factory=dict)
    router: Router = field(init=False)

    def __post_init__(self) -> None:
        self.router = Router(self.routing_state, on_cooldown=self.metrics.cooldown, deadline_for=self.deadline)

    def note_kong_read_timeout(self, config: GatewayConfig, seconds: float) -> None:
        """The read timeout of the Service Kong proxies this route to (the listener): Kong answers 504 after it,
        whatever the gateway is still doing, so every request's routing must end before it."""
        if self._kong_read_timeouts.get(config.key) == seconds:
            return
        self._kong_read_timeouts[config.key] = seconds
        if config.routing.deadline > seconds - KONG_TIMEOUT_MARGIN_S:
            log.warning("routing.deadline (%g s) does not fit in the Service's read_timeout (%g s): requests on "
                        "route %s end after %g s; raise the Service's read_timeout to keep the deadline",
                        config.routing.deadline, seconds, config.route_id or "?", self.deadline(config))
        if config.limits.stream_idle_timeout > seconds - KONG_TIMEOUT_MARGIN_S:
            log.info("limits.stream_idle_timeout (%g s) does not fit in the Service's read_timeout (%g s): streams "
                     "on route %s end after %g s without an event", config.limits.stream_idle_timeout, seconds,
                     config.route_id or "?", self.stream_idle(config))

    def stream_idle(self, config: GatewayConfig) -> float:
        """Seconds a stream may wait for the provider's next event: Kong's read timeout also bounds each gap
        between the listener's writes, and when Kong gives up first the client sees a stream that just stops
        instead of the gateway's explicit error event."""
        kong_limit = self._kong_read_timeouts.get(config.key)
        idle = config.limits.stream_idle_timeout
        return idle if kong_limit is None else max(1.0, min(idle, kong_limit - KONG_TIMEOUT_MARGIN_S))

    def deadline(self, config: GatewayConfig) -> float:
        """Seconds one request may spend routing: the configured deadline, cut to fit Kong's read timeout."""
        kong_limit = self._kong_read_timeouts.get(config.key)
        if kong_limit is None:
            return config.routing.deadline
        return max(1.0, min(config.routing.deadline, kong_limit - KONG_TIMEOUT_MARGIN_S))

    def routing_state(self, config: GatewayConfig) -> RoutingState:
        """Cooldowns and in-flight counts: shared through Redis when the route configures it, else local."""
        key: tuple = ("redis", config.redis.url, config.redis.key_prefix) if config.redis else ("memory",)
        if key not in self._routing:
            if config.redis is None:
                self._routing[key] = MemoryRoutingState()
            else:
                self._routing[key] = RedisRoutingState(self.redis(config.redis),
                                                       key_prefix=config.redis.key_prefix + "route:")
        return self._routing[key]

    def redis(self, settings: RedisSettings) -> Any:
        """One client per URL, on a pool that waits for a free connection (bounded by ``POOL_WAIT_S``) instead
        of raising at once when every connection is busy: a burst of budgeted requests on a healthy Redis must
        queue for a few milliseconds, never get 503 (redis-py's default pool raises MaxConnectionsError)."""
        if settings.url not in self._redis:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # one quick retry, not redis-py's default ten with backoff: a budget check must fail fast (503) when
            # Redis is down; the record sink has its own backoff
            pool = aioredis.BlockingConnectionPool.from_url(
                settings.url, max_connections=POOL_CONNECTIONS, timeout=max(POOL_WAIT_S, settings.timeout),
                socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout,
                retry=Retry(NoBackoff(), 1))
            self._redis[settings.url] = aioredis.Redis.from_pool(pool)
        return self._redis[settings.url]

    def budget_store(self, config: GatewayConfig) -> BudgetStore:
        """Redis when the route configures it (several Kong nodes share one budget), else this process's memory."""
        if config.redis is None:
            key: tuple = ("memory",)
            if key not in self._stores:
                self._stores[key] = MemoryBudgetStore()
            return self._stores[key]
        key = ("redis", config.redis.url, config.redis.key_prefix, config.budget_fail_open)
        if key not in self._stores:
            self._stores[key] = RedisBudgetStore(self.redis(config.redis),
                                                 key_prefix=config.redis.key_prefix + "budget:",
                                                 fail_open=config.budget_fail_open)
        self._sweep(key, self._stores[key], config)
        return self._stores[key]

    def _sweep(self, key: tuple, store: BudgetStore, config: GatewayConfig) -> None:
        """Every Redis budget store gets a lease sweeper (accounting/leases.py), started on the running loop."""
        if key in self._sweepers or not isinstance(store, RedisBudgetStore):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a config checked outside the server): the first request starts it
        from llm_gateway.accounting.leases import sweep_forever

        self._sweepers[key] = loop.create_task(sweep_forever(store, self.record_sink(config)),
                                               name="llm_gateway.lease-sweeper")

    def watch(self, config: GatewayConfig) -> None:
        """At instance start: a route with Redis starts sweeping leases now, not at its first request, so the
        reservations of a node that crashed come back even if no request follows."""
        if config.redis is not None:
            try:
                self.budget_store(config)
            except Exception:  # never fails an instance start: the first request tries again
                logging.getLogger("llm_gateway.runtime").exception("could not start the lease sweeper")

    def record_sink(self, config: GatewayConfig) -> RecordSink:
        """Usage records go to the log always, and to a Redis Stream when the route configures Redis."""
        key: tuple = (config.redis.url, config.redis.usage_stream) if config.redis else ("log",)
        if key not in self._sinks:
            client = self.redis(config.redis) if config.redis else None
            stream = config.redis.usage_stream if config.redis else "llmgw:usage"
            self._sinks[key] = RecordSink(client, stream=stream)
        return self._sinks[key]

    async def close(self) -> None:
        """Flush and close what holds Redis first, then the clients themselves; one failure stops nothing."""
        for task in self._sweepers.values():
            task.cancel()
        for task in self._sweepers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._sweepers.clear()
        closers = [sink.close for sink in self._sinks.values()] + [state.close for state in self._routing.values()]
        closers += [store.close for store in self._stores.values()] + [c.aclose for c in self._redis.values()]
        for close in closers:
            with contextlib.suppress(Exception):
                await close()
