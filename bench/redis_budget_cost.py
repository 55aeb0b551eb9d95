"""What a budgeted request costs the plugin server in Redis client CPU: one reservation and one settlement
through accounting/budget_stores/redis.py against the real Redis (127.0.0.1:6379 unless REDIS_URL), with
leases, ``concurrency`` at a time, as the listener does them. CPU is this process's own (getrusage), so Redis's
side is not counted: that is Redis's core, not the Kong node's.

    python bench/redis_budget_cost.py [--requests 5000] [--concurrency 16]

Whether hiredis is installed (the ``fast`` extra) is printed with the result: redis-py parses replies with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kong-plugins"))

import redis.asyncio as aioredis

from llm_gateway.accounting.budget_stores.redis import RedisBudgetStore
from llm_gateway.accounting.budgets import Budget, Lease


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(requests: int, concurrency: int) -> tuple[float, float]:
    """(µs of CPU per reserve + settle, pairs per second)."""
    client = aioredis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    store = RedisBudgetStore(client, key_prefix=prefix)
    budgets = [Budget(name="daily", window="day", tokens=10**12, usd=10**6)]
    meta = {"route": "bench", "alias": "bench-json", "model": "openai/mock", "prompt_tokens": 12}

    async def one(i: int) -> None:
        lease = Lease(request_id=f"{prefix}{i}", expiry=time.time() + 120, meta=meta)
        reservation, _ = await store.reserve("alice", budgets, 268, 0.0004, min_tokens=28,
                                             usd_per_token=1e-6, lease=lease)
        await store.settle(reservation, 62, 0.00009, record=f'{{"request_id":"{i}"}}')

    slots = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> None:
        async with slots:
            await one(i)

    try:
        await asyncio.gather(*(limited(-1 - i) for i in range(200)))  # warm: scripts loaded, pool filled
        cpu, started = _cpu(), time.perf_counter()
        await asyncio.gather(*(limited(i) for i in range(requests)))
        cpu, elapsed = _cpu() - cpu, time.perf_counter() - started
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return cpu * 1e6 / requests, requests / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    try:
        import hiredis  # noqa: F401
        parser_name = "hiredis"
    except ImportError:
        parser_name = "pure Python (install the fast extra for hiredis)"
    per, rate = asyncio.run(measure(args.requests, args.concurrency))
    print(f"reserve + settle: {per:.0f} µs of client CPU per request, {rate:,.0f} per s; reply parser: {parser_name}")


if __name__ == "__main__":
    main()
