"""Routing state on its own, in memory and in real Redis: cooldowns (threshold, window, success, 429 and
Retry-After, the last healthy deployment), in flight and its expiry, minute counters, two nodes sharing one
Redis, keys that expire, and routing on local state while Redis is away."""

from __future__ import annotations

import calendar
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError

from conftest import REDIS_URL, RedisNodes
from llm_gateway.routing.state import CooldownPolicy
from llm_gateway.routing.state_stores.memory import MemoryRoutingState
from llm_gateway.routing.state_stores.redis import COOLDOWN_VIEW_S, RedisRoutingState

T0 = float(calendar.timegm((2026, 11, 23, 10, 15, 0)))  # a minute boundary
A, B, C = "chat-default#0:openai/gpt-4o-mini", "chat-default#1:azure/gpt-4o-mini", "chat-default#2:{x}/y"
GROUP = [A, B, C]
POLICY = CooldownPolicy(allowed_fails=3, window_s=60, cooldown_s=30)

State = MemoryRoutingState | RedisRoutingState


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def prefix() -> str:
    return f"llmgw-test-routing-state-{secrets.token_hex(4)}:"


async def drop_keys(client: Any, key_prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{key_prefix}*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
def make_state(request: pytest.FixtureRequest, redis_nodes: RedisNodes) -> Callable[[Clock], State]:
    """Each call is one node: in Redis, its own client on the shared prefix."""
    def make(clock: Clock) -> State:
        if request.param == "memory":
            return MemoryRoutingState(clock=clock)
        return RedisRoutingState(redis_nodes.client(), key_prefix=redis_nodes.prefix, clock=clock)

    return make


@pytest.fixture
async def two_nodes() -> AsyncIterator[tuple[Clock, RedisRoutingState, RedisRoutingState]]:
    key_prefix, clock = prefix(), Clock()
    clients = [aioredis.from_url(REDIS_URL) for _ in range(2)]
    yield clock, *(RedisRoutingState(c, key_prefix=key_prefix, clock=clock) for c in clients)  # type: ignore[misc]
    await drop_keys(clients[0], key_prefix)
    for client in clients:
        await client.aclose()


async def fail(state: State, id: str, times: int, policy: CooldownPolicy = POLICY,
               group: list[str] = GROUP) -> list[float | None]:
    return [await state.failure(id, group, policy) for _ in range(times)]


async def test_cools_after_allowed_fails_and_not_before(make_state: Callable) -> None:
    clock = Clock()
    state = make_state(clock)
    assert await fail(state, A, 2) == [None, None]
    assert (await state.snapshot(GROUP)).cooling == {}
    clock.now = T0 + 2
    assert await state.failure(A, GROUP, POLICY) == T0 + 32
    snap = await state.snapshot(GROUP)
    assert snap.cooling == {A: T0 + 32}
    assert snap.in_flight == {A: 0, B: 0, C: 0}


async def test_failures_count_within_a_sliding_window(make_state: Callable) -> None:
    clock = Clock()
    state = make_state(clock)
    for t in (0, 10, 60):  # the first has left the window when the third arrives
        clock.now = T0 + t
        assert await state.failure(A, GROUP, POLICY) is None
    clock.now = T0 + 65  # 10, 60, 65: three within 60 s
    assert await state.failure(A, GROUP, POLICY) == T0 + 95


async def test_success_clears_the_failure_count(make_state: Callable) -> None:
    state = make_state(Clock())
    await fail(state, A, 2)
    await state.success(A)
    assert await fail(state, A, 2) == [None, None]
    assert await state.failure(A, GROUP, POLICY) == T0 + 30


async def test_a_429_cools_at_once_for_its_retry_after(make_state: Callable) -> None:
    state = make_state(Clock())
    assert await state.failure(A, GROUP, POLICY, rate_limited=True, retry_after=7) == T0 + 7
    assert await state.failure(B, GROUP, POLICY, rate_limited=True) == T0 + 30  # no Retry-After: cooldown_s
    assert (await state.snapshot(GROUP)).cooling == {A: T0 + 7, B: T0 + 30}
    patient = CooldownPolicy(allowed_fails=3, cooldown_s=30, cool_on_429=False)
    assert await state.failure(C, GROUP, patient, rate_limited=True, retry_after=7) is None  # an ordinary failure


async def test_retry_after_is_capped_at_ten_cooldowns_and_floored_at_a_second(make_state: Callable) -> None:
    state = make_state(Clock())
    assert await state.failure(A, GROUP, POLICY, rate_limited=True, retry_after=3600) == T0 + 300
    assert await state.failure(B, GROUP, POLICY, rate_limited=True, retry_after=0) == T0 + 1


async def test_a_later_shorter_cooldown_does_not_cut_a_longer_one(make_state: Callable) -> None:
    state = make_state(Clock())
    assert await state.failure(A, GROUP, POLICY, rate_limited=True, retry_after=200) == T0 + 200
    assert await state.failure(A, GROUP, POLICY, rate_limited=True, retry_after=5) is None
    assert (await state.snapshot(GROUP)).cooling == {A: T0 + 200}


async def test_the_cooldown_ends_when_the_clock_passes_it_and_the_count_starts_over(make_state: Callable) -> None:
    clock = Clock()
    state = make_state(clock)
    await fail(state, A, 3)
    clock.now = T0 + 29.9
    assert (await state.snapshot(GROUP)).cooling == {A: T0 + 30}
    clock.now = T0 + 30
    assert (await state.snapshot(GROUP)).cooling == {}
    assert await state.failure(A, GROUP, POLICY) is None  # cooling reset the count: one failure is not three


async def test_the_last_healthy_deployment_is_never_cooled_by_default(make_state: Callable) -> None:
    clock = Clock()
    state = make_state(clock)
    await fail(state, A, 3)
    await fail(state, B, 3)
    assert await fail(state, C, 5) == [None] * 5
    assert (await state.snapshot(GROUP)).cooling.keys() == {A, B}
    assert await fail(state, "solo", 5, group=["solo"]) == [None] * 5  # a group of one: always the last
    clock.now = T0 + 30  # A and B serve again: C's failures, still counted, now cool it
    assert await state.failure(C, GROUP, POLICY) == T0 + 60


async def test_the_last_healthy_deployment_is_cooled_when_the_policy_says_so(make_state: Callable) -> None:
    state = make_state(Clock())
    strict = CooldownPolicy(allowed_fails=1, cooldown_s=30, cool_last_healthy=True)
    for id in GROUP:
        assert await state.failure(id, GROUP, strict) == T0 + 30
    assert await state.failure("solo", ["solo"], strict) == T0 + 30
    assert (await state.snapshot([*GROUP, "solo"])).cooling.keys() == {*GROUP, "solo"}


async def test_in_flight_counts_begins_less_ends(make_state: Callable) -> None:
    state = make_state(Clock())
    await state.begin(A, "r1", 60)
    await state.begin(A, "r2", 60)
    await state.begin(A, "r2", 60)  # a retry of the same request on the same deployment: still one
    await state.begin(B, "r3", 60)
    assert (await state.snapshot(GROUP)).in_flight == {A: 2, B: 1, C: 0}
    await state.end(A, "r1", 0)
    await state.end(C, "never-begun", 0)
    assert (await state.snapshot(GROUP)).in_flight == {A: 1, B: 1, C: 0}
    await state.end(A, "r2", 0)
    await state.end(B, "r3", 0)
    assert (await state.snapshot(GROUP)).in_flight == {A: 0, B: 0, C: 0}


async def test_in_flight_of_a_request_whose_node_died_lapses_after_its_ttl(make_state: Callable) -> None:
    clock = Clock()
    state = make_state(clock)
    await state.begin(A, "orphan", 40)  # never ended
    await state.begin(A, "live", 100)
    clock.now = T0 + 39.9
    assert (await state.snapshot([A])).in_flight == {A: 2}
    clock.now = T0 + 40
    assert (await state.snapshot([A])).in_flight == {A: 1}
    clock.now = T0 + 100
    assert (await state.snapshot([A])).in_flight == {A: 0}


async def test_minute_counters_roll_over_at_the_minute(make_state: Callable) -> None:
    clock = Clock(T0 + 50)
    state = make_state(clock)
    await state.begin(A, "r1", 60)
    await state.begin(A, "r2", 60)
    await state.end(A, "r1", 120)
    snap = await state.snapshot([A, B])
    assert (snap.minute_requests, snap.minute_tokens) == ({A: 2, B: 0}, {A: 120, B: 0})
    clock.now = T0 + 60  # a new UTC minute; r2's tokens count in the minute it ended
    await state.end(A, "r2", 30)
    snap = await state.snapshot([A])
    assert (snap.minute_requests, snap.minute_tokens) == ({A: 0}, {A: 30})


async def test_awkward_ids_do_not_collide(make_state: Callable) -> None:
    state = make_state(Clock())
    ids = ["a", "a:b", "a}:cool", "{a}", "a/b"]
    await state.failure("a:b", ids, POLICY, rate_limited=True)
    await state.begin("a}:cool", "r", 60)
    snap = await state.snapshot(ids)
    assert snap.cooling.keys() == {"a:b"}
    assert snap.in_flight == {"a": 0, "a:b": 0, "a}:cool": 1, "{a}": 0, "a/b": 0}
    assert (await state.snapshot([])).cooling == {}


async def test_two_nodes_share_cooldowns_failures_in_flight_and_minutes(two_nodes: tuple) -> None:
    _, one, two = two_nodes
    until = await one.failure(A, GROUP, POLICY, rate_limited=True, retry_after=10)
    assert (await two.snapshot(GROUP)).cooling == {A: until}
    await one.failure(B, GROUP, POLICY)
    await two.failure(B, GROUP, POLICY)
    assert await one.failure(B, GROUP, POLICY) == T0 + 30  # three failures, seen by two nodes
    await two.success(C)
    await one.begin(C, "r1", 60)
    await two.begin(C, "r2", 60)
    assert (await two.snapshot([C])).in_flight == {C: 2}
    await two.end(C, "r1", 40)  # a request may end on another node's call: the mark is shared
    snap = await one.snapshot([C])
    assert (snap.in_flight, snap.minute_requests, snap.minute_tokens) == ({C: 1}, {C: 2}, {C: 40})
    assert await two.failure(C, GROUP, POLICY, rate_limited=True) is None  # A and B cool everywhere: C is last


async def test_a_cooldown_only_view_is_a_moment_old_at_most_and_never_for_what_this_node_learnt(
        two_nodes: tuple) -> None:
    """An alias whose strategy reads no counts routes on cooldowns read within COOLDOWN_VIEW_S (no round trip
    per request): another node's cooldown shows once the view has aged out; this node's own failure at once."""
    clock, one, two = two_nodes
    assert (await two.snapshot(GROUP, counts=False)).cooling == {}
    clock.now = T0 + 0.1
    until = await one.failure(A, GROUP, POLICY, rate_limited=True, retry_after=10)
    assert (await two.snapshot(GROUP, counts=False)).cooling == {}, "read from the view"
    assert (await two.snapshot(GROUP)).cooling == {A: until}, "counts: always read fresh"
    clock.now = T0 + COOLDOWN_VIEW_S + 0.01
    assert (await two.snapshot(GROUP, counts=False)).cooling == {A: until}
    clock.now = T0 + 1
    assert (await one.snapshot(GROUP, counts=False)).cooling == {A: until}
    cooled_b = await one.failure(B, GROUP, POLICY, rate_limited=True, retry_after=5)  # forgets one's view
    assert (await one.snapshot(GROUP, counts=False)).cooling == {A: until, B: cooled_b}
    clock.now = cooled_b - 0.2
    assert (await one.snapshot(GROUP, counts=False)).cooling == {A: until, B: cooled_b}  # a view, read now
    clock.now = cooled_b + 0.1  # B's cooldown ends while that view is still young: the view drops it by its time
    assert (await one.snapshot(GROUP, counts=False)).cooling == {A: until}


async def test_every_redis_key_expires() -> None:
    clock, key_prefix = Clock(), prefix()
    client = aioredis.from_url(REDIS_URL)
    state = RedisRoutingState(client, key_prefix=key_prefix, clock=clock)
    try:
        await state.failure(A, GROUP, POLICY, rate_limited=True, retry_after=12)
        await state.failure(B, GROUP, POLICY)
        await state.begin(C, "r1", 45)
        await state.end(C, "r2", 10)
        ttls = {k.decode().rsplit(":", 2)[-2] if b":rpm:" in k or b":tpm:" in k else k.decode().rsplit(":", 1)[-1]:
                await client.pttl(k) async for k in client.scan_iter(match=f"{key_prefix}*")}
        assert ttls.keys() == {"cool", "fails", "inflight", "rpm", "tpm"}
        # Redis counts down in real time while this test awaits: a loaded machine takes seconds, not the TTLs
        assert 7_000 < ttls["cool"] <= 12_000
        assert 55_000 < ttls["fails"] <= 60_000
        assert 40_000 < ttls["inflight"] <= 45_000
        assert 0 < ttls["rpm"] <= 120_000 and 0 < ttls["tpm"] <= 120_000
    finally:
        await drop_keys(client, key_prefix)
        await client.aclose()


async def test_memory_state_stays_bounded() -> None:
    clock = Clock()
    state = MemoryRoutingState(clock=clock)
    for n in range(100):
        id = f"d{n}"
        await state.begin(id, "r", 30)
        await state.end(id, "other", 5)
        await state.failure(id, [id, "spare"], POLICY, rate_limited=n % 2 == 0)
    clock.now = T0 + 3600
    await state.snapshot([])
    assert (state._cool, state._fails, state._in_flight, state._minutes) == ({}, {}, {}, {})


async def test_unreachable_redis_routes_on_local_state_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.3)
    state = RedisRoutingState(client, clock=clock, retry_s=0)  # every call tries Redis, and falls back
    try:
        with caplog.at_level(logging.WARNING, logger="llm_gateway.routing_state"):
            await state.begin(A, "r1", 60)
            await state.end(A, "r0", 25)
            assert await fail(state, B, 3) == [None, None, T0 + 30]
            await state.success(C)
            snap = await state.snapshot(GROUP)
        assert snap.cooling == {B: T0 + 30} and snap.in_flight == {A: 1, B: 0, C: 0}
        assert snap.minute_requests[A] == 1 and snap.minute_tokens[A] == 25
        warnings = [r for r in caplog.records if r.name == "llm_gateway.routing_state"]
        assert len(warnings) == 1 and "local state" in warnings[0].getMessage()
    finally:
        await client.aclose()


class Outage:
    """A client that can lose its Redis: while ``down``, every command is refused; counts what reaches Redis."""

    def __init__(self, client: Any) -> None:
        self.client, self.down, self.calls = client, False, 0

    def register_script(self, script: str) -> AsyncScript:
        return AsyncScript(self, script)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.down:
                raise RedisConnectionError("Connection refused")
            return await attr(*args, **kwargs)

        return call


async def test_an_outage_routes_locally_then_back_on_shared_state(two_nodes: tuple,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    clock, other, node = two_nodes
    outage = Outage(node._client)
    state = RedisRoutingState(outage, key_prefix=node._prefix, clock=clock, retry_s=5)
    await other.failure(A, GROUP, POLICY, rate_limited=True, retry_after=60)
    with caplog.at_level(logging.WARNING, logger="llm_gateway.routing_state"):
        outage.down = True
        assert (await state.snapshot(GROUP)).cooling == {}  # local state: it never saw A's cooldown
        outage.down = False
        calls = outage.calls
        clock.now = T0 + 4.9  # within retry_s: no wait on Redis, even though it is back
        await state.begin(B, "r1", 60)
        assert (await state.snapshot(GROUP)).in_flight[B] == 1
        assert outage.calls == calls
        clock.now = T0 + 5
        snap = await state.snapshot(GROUP)
    assert snap.cooling == {A: T0 + 60} and snap.in_flight[B] == 0  # shared state again
    messages = [r.getMessage() for r in caplog.records if r.name == "llm_gateway.routing_state"]
    assert len(messages) == 2 and "unavailable" in messages[0] and "again" in messages[1]
