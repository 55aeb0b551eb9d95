"""Budget stores on their own: strict admission, settlement, release, windows, isolation, and, for Redis,
atomicity across two clients and fail-closed / fail-open when Redis cannot be reached."""

from __future__ import annotations

import asyncio
import calendar
import secrets
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from conftest import REDIS_URL, RedisNodes
from llm_gateway.accounting.budget_stores.memory import MemoryBudgetStore
from llm_gateway.accounting.budget_stores.redis import RedisBudgetStore
from llm_gateway.accounting.budgets import (
    Budget,
    BudgetExceeded,
    BudgetUnavailable,
    window_bounds,
)

T0 = float(calendar.timegm((2026, 11, 23, 10, 15, 0)))  # a minute boundary, mid-hour


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def minute(tokens: int | None = 100, usd: float | None = None, name: str = "m") -> Budget:
    return Budget(name=name, window="minute", tokens=tokens, usd=usd)


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest, redis_nodes: RedisNodes) -> Callable:
    def make(clock: Clock) -> MemoryBudgetStore | RedisBudgetStore:
        if request.param == "memory":
            return MemoryBudgetStore(clock=clock)
        return RedisBudgetStore(redis_nodes.client(), key_prefix=redis_nodes.prefix, clock=clock)

    return make


def test_windows_are_fixed_utc_periods() -> None:
    assert window_bounds("minute", T0 + 59.9) == (int(T0), int(T0) + 60)
    assert window_bounds("hour", T0) == (calendar.timegm((2026, 11, 23, 10, 0, 0)),
                                         calendar.timegm((2026, 11, 23, 11, 0, 0)))
    assert window_bounds("day", T0) == (calendar.timegm((2026, 11, 23, 0, 0, 0)),
                                        calendar.timegm((2026, 11, 24, 0, 0, 0)))
    december = calendar.timegm((2026, 12, 31, 23, 59, 59))
    assert window_bounds("month", december) == (calendar.timegm((2026, 12, 1, 0, 0, 0)),
                                                calendar.timegm((2027, 1, 1, 0, 0, 0)))


async def test_admits_while_the_reservation_fits_then_refuses_until_the_window_ends(make_store: Callable) -> None:
    clock = Clock(T0 + 20)
    store = make_store(clock)
    _, headroom = await store.reserve("bob", [minute()], 60, 0.0)
    assert headroom is not None and (headroom.limit_tokens, headroom.remaining_tokens) == (100, 40)
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("bob", [minute()], 41, 0.0)
    assert refused.value.kind == "token" and refused.value.retry_after == 40 and not refused.value.never_fits
    await store.reserve("bob", [minute()], 40, 0.0)  # exactly fills the limit
    assert (await store.usage("bob", minute()))[0] == 100
    clock.now = T0 + 60  # next window: a fresh budget
    _, headroom = await store.reserve("bob", [minute()], 100, 0.0)
    assert headroom is not None and headroom.remaining_tokens == 0


async def test_settlement_replaces_the_reservation_and_release_returns_it(make_store: Callable) -> None:
    store = make_store(Clock())
    reservation, _ = await store.reserve("bob", [minute()], 80, 0.0)
    headroom = await store.settle(reservation, 25, 0.0)
    assert headroom is not None and headroom.remaining_tokens == 75
    assert (await store.usage("bob", minute()))[0] == 25
    failed, _ = await store.reserve("bob", [minute()], 70, 0.0)
    await store.release(failed)
    assert (await store.usage("bob", minute()))[0] == 25
    # the provider may charge more than estimated: the budget counts what was charged
    over, _ = await store.reserve("bob", [minute()], 10, 0.0)
    await store.settle(over, 90, 0.0)
    assert (await store.usage("bob", minute()))[0] == 115
    with pytest.raises(BudgetExceeded):
        await store.reserve("bob", [minute()], 1, 0.0)


async def test_settlement_lands_in_the_window_the_reservation_was_taken_in(make_store: Callable) -> None:
    clock = Clock(T0 + 59)
    store = make_store(clock)
    reservation, _ = await store.reserve("bob", [minute()], 50, 0.0)
    clock.now = T0 + 61
    await store.settle(reservation, 30, 0.0)
    assert (await store.usage("bob", minute()))[0] == 0  # the new window is untouched
    clock.now = T0 + 59
    assert (await store.usage("bob", minute()))[0] == 30


async def test_usd_budgets_add_exactly_in_micro_dollars(make_store: Callable) -> None:
    store = make_store(Clock())
    budget = minute(tokens=None, usd=0.01)
    for _ in range(100):
        reservation, headroom = await store.reserve("bob", [budget], 1, 0.0001)
        await store.settle(reservation, 1, 0.0001)
        assert headroom is None  # no token budget: nothing for X-RateLimit-*-Tokens
    tokens, usd = await store.usage("bob", budget)
    assert (tokens, usd) == (100, 0.01)
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("bob", [budget], 1, 0.000001)
    assert refused.value.kind == "usd" and refused.value.limit == 0.01


async def test_several_budgets_are_all_or_nothing_and_the_tightest_is_reported(make_store: Callable) -> None:
    store = make_store(Clock())
    budgets = [minute(tokens=100, name="burst"), Budget(name="daily", window="day", tokens=1000)]
    _, headroom = await store.reserve("bob", budgets, 90, 0.0)
    assert headroom is not None and (headroom.limit_tokens, headroom.remaining_tokens) == (100, 10)
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("bob", budgets, 20, 0.0)
    assert refused.value.budget.name == "burst"
    assert (await store.usage("bob", budgets[1]))[0] == 90  # the refused request charged neither budget


async def test_consumers_are_isolated_even_with_awkward_names(make_store: Callable) -> None:
    store = make_store(Clock())
    await store.reserve("a:b{c}", [minute()], 100, 0.0)
    await store.reserve("a", [minute()], 100, 0.0)
    assert (await store.usage("a:b{c}", minute()))[0] == 100
    assert (await store.usage("a:b", minute()))[0] == 0


async def test_a_request_larger_than_the_whole_budget_is_told_so(make_store: Callable) -> None:
    store = make_store(Clock())
    with pytest.raises(BudgetExceeded) as refused:
        await store.reserve("bob", [minute()], 101, 0.0)
    assert refused.value.never_fits


async def test_two_redis_clients_never_admit_past_the_limit() -> None:
    """Two nodes, 200 concurrent reservations of 10 tokens against 1,000: exactly 100 admitted."""
    prefix = f"llmgw-test-budgets-{secrets.token_hex(4)}:"
    clients = [aioredis.from_url(REDIS_URL, max_connections=100) for _ in range(2)]
    stores = [RedisBudgetStore(c, key_prefix=prefix) for c in clients]
    budget = Budget(name="shared", window="day", tokens=1000)

    async def one(i: int) -> bool:
        try:
            await stores[i % 2].reserve("carol", [budget], 10, 0.0)
            return True
        except BudgetExceeded:
            return False

    try:
        admitted = await asyncio.gather(*(one(i) for i in range(200)))
        assert sum(admitted) == 100
        assert (await stores[1].usage("carol", budget))[0] == 1000
        ttl = await clients[0].ttl(next(iter([k async for k in clients[0].scan_iter(match=f"{prefix}*")])))
        assert 0 < ttl <= 86400 + 300  # counters expire with their window
    finally:
        await clients[0].delete(*[k async for k in clients[0].scan_iter(match=f"{prefix}*")])
        for client in clients:
            await client.aclose()


async def test_unreachable_redis_fails_closed_by_default_and_open_when_configured() -> None:
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        with pytest.raises(BudgetUnavailable):
            await RedisBudgetStore(client).reserve("bob", [minute()], 10, 0.0)
        store = RedisBudgetStore(client, fail_open=True)
        reservation, headroom = await store.reserve("bob", [minute()], 10, 0.0)
        assert headroom is None and reservation.charges == []
        assert await store.settle(reservation, 5, 0.0) is None  # nothing was tracked, nothing to settle
    finally:
        await client.aclose()
