"""Reservations as leases in Redis, and the usage stream's one entry per request id: capped grants, settled
leases deleted once their record is in the stream, expired ones swept back (and recorded as lost), late
reservations refused by a cancellation's tombstone, idempotent record writes, and a pool that queues a burst
instead of refusing it."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import pytest
import redis.asyncio as aioredis

from conftest import REDIS_URL, RedisNodes
from llm_gateway.accounting import leases
from llm_gateway.accounting.budget_stores.memory import MemoryBudgetStore
from llm_gateway.accounting.budget_stores.redis import RedisBudgetStore
from llm_gateway.accounting.budgets import (
    Budget,
    BudgetExceeded,
    BudgetUnavailable,
    Lease,
)
from llm_gateway.accounting.records import RecordSink, UsageRecord
from llm_gateway.accounting.tokens import TokenUsage
from llm_gateway.config import ConfigRegistry, RedisSettings
from llm_gateway.kong.ticket import TicketBook
from llm_gateway.runtime import Runtime

HOUR = Budget(name="h", window="hour", tokens=1000)


def _lease(rid: str, seconds: float = 60.0) -> Lease:
    return Lease(rid, time.time() + seconds, {"request_id": rid, "consumer": "dora", "alias": "chat",
                                              "provider": "openai", "model": "m", "stream": True, "prompt": 10})


def _record(rid: str, tokens: int = 30) -> UsageRecord:
    return UsageRecord(request_id=rid, consumer="dora", consumer_id=None, route=None, alias="chat",
                       provider="openai", model="m", stream=False, status=200, error_code=None,
                       usage=TokenUsage(10, tokens - 10, tokens, 0, 0, False), cost_usd=None, latency_ms=1.0,
                       ttft_ms=None)


async def _entries(client: aioredis.Redis, stream: str) -> list[dict]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in await client.xrange(stream)]


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_reservation_is_capped_to_what_the_budget_has_left(kind: str, redis_nodes: RedisNodes) -> None:
    store = MemoryBudgetStore() if kind == "memory" else RedisBudgetStore(redis_nodes.client(),
                                                                          key_prefix=redis_nodes.prefix)
    budget = Budget(name="h", window="hour", tokens=100)
    first, _ = await store.reserve("dora", [budget], 70, 0.0, min_tokens=20)
    assert first.tokens == 70  # fits whole
    capped, headroom = await store.reserve("dora", [budget], 70, 0.0, min_tokens=20)
    assert capped.tokens == 30 and headroom is not None and headroom.remaining_tokens == 0
    with pytest.raises(BudgetExceeded):
        await store.reserve("dora", [budget], 70, 0.0, min_tokens=1)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_usd_budget_caps_the_tokens_at_their_price(kind: str, redis_nodes: RedisNodes) -> None:
    store = MemoryBudgetStore() if kind == "memory" else RedisBudgetStore(redis_nodes.client(),
                                                                          key_prefix=redis_nodes.prefix)
    budget = Budget(name="d", window="day", usd=0.001)  # 1000 micro-dollars, 1 micro-dollar per token
    reservation, _ = await store.reserve("dora", [budget], 5000, 0.005, min_tokens=100, usd_per_token=1e-6)
    assert reservation.tokens == 1000 and reservation.usd_micro == 1000


async def test_a_settled_lease_is_deleted_once_its_record_is_in_the_stream(redis_nodes: RedisNodes) -> None:
    client = redis_nodes.client()
    store = RedisBudgetStore(client, key_prefix=redis_nodes.prefix)
    sink = RecordSink(client, stream=f"{redis_nodes.prefix}usage")
    rid = secrets.token_hex(8)
    reservation, _ = await store.reserve("dora", [HOUR], 200, 0.0, lease=_lease(rid))
    assert reservation.lease is not None and await store.leases("dora") == 1
    line = sink.emit(_record(rid), lease=reservation.lease, forget=store.forget)
    await sink.flush()
    assert await store.leases("dora") == 1, "an unsettled lease stays until it settles"
    await store.settle(reservation, 30, 0.0, line)
    assert (await store.usage("dora", HOUR))[0] == 30
    sink.emit_line(rid, line or "", lease=reservation.lease, forget=store.forget, log_it=False)
    await sink.flush()
    assert await store.leases("dora") == 0
    assert [e["request_id"] for e in await _entries(client, sink.stream)] == [rid], "written once"
    await sink.close()


async def test_an_expired_lease_comes_back_and_its_request_is_recorded_as_lost(redis_nodes: RedisNodes) -> None:
    client = redis_nodes.client()
    store = RedisBudgetStore(client, key_prefix=redis_nodes.prefix)
    sink = RecordSink(client, stream=f"{redis_nodes.prefix}usage")
    crashed, settled = secrets.token_hex(8), secrets.token_hex(8)
    await store.reserve("dora", [HOUR], 200, 0.002, lease=_lease(crashed, seconds=0.3))
    done, _ = await store.reserve("dora", [HOUR], 100, 0.0, lease=_lease(settled, seconds=0.3))
    await store.settle(done, 40, 0.0, json.dumps({"request_id": settled}))  # its record never reached the stream
    assert (await store.usage("dora", HOUR))[0] == 240
    assert await leases.sweep_once(store, sink) == 0  # not expired yet
    await asyncio.sleep(0.4)
    assert await leases.sweep_once(store, sink) == 2
    await sink.flush()
    assert (await store.usage("dora", HOUR))[0] == 40, "the crashed reservation came back, the settled one stays"
    assert await store.leases("dora") == 0
    records = {e["request_id"]: json.loads(e["record"]) for e in await _entries(client, sink.stream)}
    assert records[settled] == {"request_id": settled}
    lost = records[crashed]
    assert lost["lost"] is True and lost["status"] == 0 and lost["error_code"] == "gateway_crashed"
    assert lost["total_tokens"] == 200 and lost["prompt_tokens"] == 10 and lost["cost_usd"] == 0.002
    assert lost["consumer"] == "dora" and lost["alias"] == "chat" and lost["stream"] is True
    assert await leases.sweep_once(store, sink) == 0  # nothing twice
    await sink.close()


async def test_a_cancelled_request_takes_nothing_even_when_redis_runs_its_reservation_late(
        redis_nodes: RedisNodes) -> None:
    client = redis_nodes.client()
    store = RedisBudgetStore(client, key_prefix=redis_nodes.prefix)
    late, applied = secrets.token_hex(8), secrets.token_hex(8)
    tag = store._consumer_tag("dora")
    keys = store._lease_keys(tag)
    # the node gave up on this reservation (answered 503) and cancelled it before Redis ran it
    await store._scripts["cancel"](keys=keys, args=[late, repr(time.time() + 60)])
    with pytest.raises(BudgetUnavailable):
        await store.reserve("dora", [HOUR], 200, 0.0, lease=_lease(late))
    assert (await store.usage("dora", HOUR))[0] == 0
    # Redis ran it before the cancellation arrived: the cancellation gives it back
    await store.reserve("dora", [HOUR], 200, 0.0, lease=_lease(applied))
    await store._scripts["cancel"](keys=keys, args=[applied, repr(time.time() + 60)])
    assert (await store.usage("dora", HOUR))[0] == 0 and await store.leases("dora") == 0


async def test_a_record_is_written_once_whoever_retries_it(redis_nodes: RedisNodes) -> None:
    client = redis_nodes.client()
    stream = f"{redis_nodes.prefix}usage"
    first, second = RecordSink(client, stream=stream), RecordSink(client, stream=stream)
    record = _record(secrets.token_hex(8))
    first.emit(record)
    second.emit(record)  # e.g. a batch retried after a timeout whose first write had landed
    await first.flush()
    await second.flush()
    assert len(await _entries(client, stream)) == 1 and first.duplicates + second.duplicates == 1
    # a lost record, then the real one from a node that came back: the second says it supersedes the first
    rid = secrets.token_hex(8)
    first.emit(UsageRecord(**{**_record(rid).__dict__, "lost": True, "status": 0}))
    await first.flush()
    second.emit(_record(rid))
    second.emit(_record(rid))
    await second.flush()
    entries = [e for e in await _entries(client, stream) if e["request_id"] == rid]
    assert len(entries) == 2 and entries[1]["supersedes"] == "lost" and "supersedes" not in entries[0]
    await first.close()
    await second.close()


async def test_300_concurrent_budgeted_requests_on_a_healthy_redis_all_get_through(
        redis_nodes: RedisNodes) -> None:
    """redis.asyncio.from_url's pool raises MaxConnectionsError at its 101st connection: the runtime's waits."""
    runtime = Runtime(registry=ConfigRegistry(), tickets=TicketBook(ttl_seconds=5))
    client = runtime.redis(RedisSettings(url=REDIS_URL, key_prefix=redis_nodes.prefix))
    store = RedisBudgetStore(client, key_prefix=redis_nodes.prefix)
    budget = Budget(name="big", window="hour", tokens=10_000_000)

    async def one(i: int) -> None:
        reservation, _ = await store.reserve("erin", [budget], 100, 0.0, lease=_lease(f"r{i}-{secrets.token_hex(4)}"))
        await store.settle(reservation, 10, 0.0)

    outcomes = await asyncio.gather(*(one(i) for i in range(300)), return_exceptions=True)
    assert [o for o in outcomes if o is not None] == []
    assert (await store.usage("erin", budget))[0] == 3000 and await store.leases("erin") == 0
    assert store.pending == 0
    await runtime.close()




async def test_one_sweep_takes_every_expired_lease_beyond_one_batch(redis_nodes: RedisNodes) -> None:
    from llm_gateway.accounting.budget_stores import redis as redis_store

    client = redis_nodes.client()
    store = RedisBudgetStore(client, key_prefix=redis_nodes.prefix)
    sink = RecordSink(client, stream=f"{redis_nodes.prefix}usage")
    n = redis_store.SWEEP_BATCH * 2 + 7
    big = Budget(name="big", window="hour", tokens=1_000_000)
    for start in range(0, n, 50):  # the test's plain client has from_url's 100-connection pool
        await asyncio.gather(*(store.reserve(f"c{i % 3}", [big], 10, 0.0, lease=_lease(f"r{i}", seconds=1.5))
                               for i in range(start, min(n, start + 50))))
    await asyncio.sleep(1.6)
    assert await leases.sweep_once(store, sink) == n
    assert await client.zcard(store.lease_index) == 0
    assert [(await store.usage(f"c{i}", big))[0] for i in range(3)] == [0, 0, 0]
    await sink.close()
