"""Health of deployments as routing needs it: cooldowns, failure counts, requests in flight, and requests and
tokens in the current fixed UTC minute (for rpm/tpm caps).

Two stores behind one interface: ``MemoryRoutingState`` (one process) and ``RedisRoutingState`` (every Kong node
and plugin-server process pointing at one Redis shares it: a deployment cooled by one node is skipped by all, and
in-flight counts and caps are global). Each operation is one round trip; the ones that read and then write are
one Lua script, so concurrent nodes never both miss a threshold. A snapshot that needs no counts (the alias's
strategy reads only cooldowns) may come from a view the process read a moment ago (``COOLDOWN_VIEW_S``).

In flight is a sorted set per deployment, member the request id, score its expiry (start + the call's timeout
and a grace): a node that dies mid-request cannot leave a deployment looking busy forever, its marks lapse.

Redis being away must never fail a request. Routing state is advisory (the worst a stale view does is send a
request to a deployment that is cooling elsewhere, or misjudge a cap for a few seconds), unlike budgets, which
fail closed. So when Redis cannot be reached each operation logs (at most once every 30 s), answers from a local
``MemoryRoutingState`` instead, and keeps doing so for ``retry_s`` before trying Redis again, so a Redis that
times out costs one timeout per ``retry_s``, not one per call. State written locally during an outage stays
local; marks begun in one store and ended in the other lapse with their expiry.

Keys are ``<prefix>{<quoted deployment id>}:<kind>``: one Cluster hash slot per deployment. A snapshot, and a
failure's look at the rest of its group, touch several deployments, hence several slots in one script: single-node
Redis and Sentinel serve that; Redis Cluster refuses it (CROSSSLOT), and routing then runs on local state.

Times are epoch seconds from the injected clock, passed to the scripts as arguments (not Redis TIME), so tests
can move them; key TTLs are relative durations, there only to bound memory, never to decide.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

T = TypeVar("T")

MINUTE_TTL_S = 120  # a minute's counters outlive it by one more minute, then Redis drops them
WARN_EVERY_S = 30.0
SWEEP_EVERY_S = 60.0


@dataclass(frozen=True)
class CooldownPolicy:
    allowed_fails: int = 3  # failures within window_s before a deployment cools down
    window_s: float = 60.0
    cooldown_s: float = 30.0
    cool_on_429: bool = True  # a 429 cools at once, for the provider's Retry-After if given (capped), else cooldown_s
    cool_last_healthy: bool = False  # the last deployment of a group that is not cooling is never cooled unless True

    def duration(self, rate_limited: bool, retry_after: float | None) -> float:
        """How long a cooldown lasts: a 429's Retry-After, at least 1 s (so it exists) and at most 10 cooldowns
        (a provider asking for an hour should not take a deployment out of every node for an hour)."""
        if rate_limited and retry_after is not None and not math.isnan(retry_after):
            return min(max(retry_after, 1.0), 10 * self.cooldown_s)
        return self.cooldown_s

    def cools_now(self, rate_limited: bool) -> bool:
        return rate_limited and self.cool_on_429


@dataclass(frozen=True)
class Snapshot:
    cooling: Mapping[str, float]  # deployment id -> epoch seconds when it may serve again (only ids cooling now)
    in_flight: Mapping[str, int]  # requests in flight per deployment id, across all nodes sharing the state
    minute_requests: Mapping[str, int]  # requests started in the current fixed UTC minute (for rpm caps)
    minute_tokens: Mapping[str, int]  # tokens ended in the current minute (for tpm caps)


class RoutingState(Protocol):
    async def snapshot(self, ids: Sequence[str], counts: bool = True) -> Snapshot:
        """``counts`` False: the caller reads only ``cooling``; a store may then answer from a view a moment old."""
        ...
    async def begin(self, id: str, request_id: str, ttl_s: float) -> None: ...
    async def end(self, id: str, request_id: str, tokens: int) -> None: ...
    async def failure(self, id: str, group: Sequence[str], policy: CooldownPolicy, *, rate_limited: bool = False,
                      retry_after: float | None = None) -> float | None: ...
    async def success(self, id: str) -> None: ...
    async def close(self) -> None: ...


def _minute(now: float) -> int:
    return int(now // 60)


def _others(id: str, group: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(other for other in group if other != id))


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)
    expires: float = 0.0  # the newest failure leaves the window then


@dataclass
class _Minute:
    minute: int
    requests: int = 0
    tokens: int = 0
