"""The lease sweeper every node runs: reservations of requests that never settled (their node was killed, or
lost Redis until the lease ended) come back to their budgets, and each such request gets a usage record.

A swept lease that had settled still holds its final record (the node settled, then died or lost Redis
before the stream had the record): the sweeper writes that record. One that never settled is recorded as
*lost*: ``status`` 0, ``error_code`` ``gateway_crashed``, ``lost`` true, ``truncated`` true, and the reserved
amounts (prompt estimate, granted completion, their cost) as ``usage`` and ``cost_usd``: an upper bound of
what the provider may have charged, for an operator to reconcile with the provider's own usage export. A
request without budget (it holds a lease that reserves nothing, so that a crash still leaves its trace) is
recorded with no usage: only the provider knows it. Both go
through the record sink's idempotent write, so a record already in the stream is never written twice.

Every node sweeps at instance start and every ``SWEEP_EVERY_S``; several nodes sweeping at once is safe (each
lease is taken by one atomic script).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from llm_gateway.accounting.budget_stores.redis import RedisBudgetStore
from llm_gateway.accounting.budgets import MICRO, ExpiredLease
from llm_gateway.accounting.records import RecordSink, UsageRecord
from llm_gateway.accounting.tokens import TokenUsage

log = logging.getLogger("llm_gateway.leases")

SWEEP_EVERY_S = 2.0
LOST_CODE = "gateway_crashed"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def lost_record(lease: ExpiredLease) -> UsageRecord:
    """The record of a request whose node never settled it: what it reserved, as an upper bound."""
    meta = lease.meta
    prompt = min(_int(meta.get("prompt")), lease.tokens)
    usage = None  # a request without budget reserved nothing: what it used is unknown
    if lease.tokens:
        usage = TokenUsage(prompt=prompt, completion=lease.tokens - prompt, total=lease.tokens, cached=0,
                           reasoning=0, estimated=True)
    admitted = meta.get("admitted_at")
    return UsageRecord(
        request_id=lease.request_id, consumer=_str(meta.get("consumer")), consumer_id=_str(meta.get("consumer_id")),
        route=_str(meta.get("route")), alias=_str(meta.get("alias")) or "", provider=_str(meta.get("provider")) or "",
        model=_str(meta.get("model")) or "", stream=meta.get("stream") is True, status=0, error_code=LOST_CODE,
        usage=usage, cost_usd=lease.usd_micro / MICRO if lease.usd_micro else None,
        latency_ms=(time.time() - admitted) * 1000 if isinstance(admitted, int | float) else 0.0, ttft_ms=None,
        deployment=_str(meta.get("deployment")), truncated=True, lost=True,
        endpoint=_str(meta.get("endpoint")) or "chat.completions")


async def sweep_once(store: RedisBudgetStore, sink: RecordSink) -> int:
    """Sweep expired leases once; returns how many were taken."""
    expired = await store.sweep()
    lost = 0
    for lease in expired:
        if lease.record is not None:
            sink.emit_line(lease.request_id, lease.record, log_it=False)  # its node logged it already
        else:
            lost += 1
            sink.emit(lost_record(lease))
    if lost:
        log.warning("%d budget reservations outlived their leases (a node died or lost Redis): given back, "
                    "their requests recorded as lost", lost)
    return len(expired)


async def sweep_forever(store: RedisBudgetStore, sink: RecordSink, every_s: float = SWEEP_EVERY_S) -> None:
    """At once, then every ``every_s``; Redis being away is logged once per outage, never raised."""
    failing = False
    while True:
        try:
            await sweep_once(store, sink)
            if failing:
                failing = False
                log.warning("lease sweeper: Redis answers again")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not failing:
                failing = True
                log.warning("lease sweeper: cannot sweep (%s); retrying", type(exc).__name__)
        await asyncio.sleep(every_s)
