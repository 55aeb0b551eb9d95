"""Per-consumer token and USD budgets over fixed UTC windows, reserved before the provider call and settled
to the actual usage after it.

Admission is strict, as OpenAI's own limiter counts ``max_tokens``: a request is admitted only when what is
already used plus its reservation fits every budget that applies. Settlement replaces the reservation by the
actual usage (which may be more, when the estimate was low: the provider charged it, so the budget counts it).
Concurrent admissions therefore never exceed a limit by more than one estimate's error.

A reservation may also be *capped* (``min_tokens``): the store then grants as much of the wanted completion
as every budget has left, but at least ``min_tokens`` (else it refuses), so a consumer near its limit gets a
shorter answer rather than an overshoot; the caller limits ``max_tokens`` upstream to what was granted.

In Redis each reservation of a request also holds a *lease* (``Lease``): the reserved amounts and what is known
of the request, expiring when the request must be over (its deadline plus a grace). Settlement turns the lease
into a settled one carrying the final usage record, which the record sink deletes once that record is in the
usage stream. ``sweep`` (every node runs it, see accounting/leases.py) takes expired leases atomically: an unsettled one
gives its reservation back and is reported as lost (the node that held it crashed or lost Redis); a settled one
still waiting for its record gets it written (idempotently). An outcome that could not be learnt (Redis timed
out on a reservation) is cancelled by request id: a tombstone makes a reservation that Redis applies late a
no-op, and settlement, cancellation and sweeping are idempotent, so they are retried (bounded) until Redis
answers or the lease ends.

Two stores behind one interface: ``MemoryBudgetStore`` (one node) and ``RedisBudgetStore`` (several Kong nodes
share a budget; each operation is one Lua script, so check-and-reserve is atomic across nodes). USD amounts are
kept as integer micro-dollars so concurrent increments add exactly.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

#: window name -> length in seconds; a month is a calendar month (UTC), so its length varies
WINDOWS: dict[str, int | None] = {"minute": 60, "hour": 3600, "day": 86400, "month": None}
MICRO = 1_000_000


@dataclass(frozen=True)
class Budget:
    name: str
    window: str
    tokens: int | None = None
    usd: float | None = None
    consumers: frozenset[str] | None = None  # None: every consumer

    def applies_to(self, *identities: str | None) -> bool:
        """A budget names consumers by username or id; absent means it applies to everyone."""
        if self.consumers is None:
            return any(identities)
        return any(i in self.consumers for i in identities if i)

    @property
    def usd_micro(self) -> int | None:
        return None if self.usd is None else round(self.usd * MICRO)


def window_bounds(window: str, now: float) -> tuple[int, int]:
    """[start, end) of the fixed UTC window holding ``now``, in epoch seconds: all nodes agree on the window."""
    length = WINDOWS[window]
    if length is not None:
        start = int(now // length) * length
        return start, start + length
    day = datetime.fromtimestamp(now, UTC)
    start = calendar.timegm((day.year, day.month, 1, 0, 0, 0))
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return start, calendar.timegm((year, month, 1, 0, 0, 0))


@dataclass(frozen=True)
class Charge:
    """One budget's share of a reservation, bound to the window it was taken in (settlement hits that one)."""
    budget: Budget
    key: str
    window_end: int


@dataclass(frozen=True)
class Lease:
    """What a reservation's lease in Redis says about its request: it ends at ``expiry`` (epoch seconds), and
    ``meta`` (JSON-able: request id, consumer, route, alias, model, prompt estimate...) is what a lost-request
    record is built from if the request never settles."""

    request_id: str
    expiry: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LeaseRef:
    """Where a settled lease lives, so the record sink can delete it once the record is in the stream."""

    leases_key: str
    data_key: str
    request_id: str
    expiry: float


@dataclass
class Reservation:
    consumer: str
    tokens: int  # what was reserved (granted): at most what was asked, at least min_tokens when capped
    usd_micro: int
    charges: list[Charge] = field(default_factory=list)
    lease: LeaseRef | None = None  # set when the reservation holds a lease in Redis


@dataclass(frozen=True)
class Headroom:
    """The tightest token budget after this request: what X-RateLimit-*-Tokens report."""
    limit_tokens: int | None
    remaining_tokens: int | None


class BudgetExceeded(Exception):
    def __init__(self, budget: Budget, kind: str, limit: float, used: float, requested: float,
                 retry_after: int) -> None:
        super().__init__(f"budget {budget.name} ({kind}) exhausted")
        self.budget, self.kind, self.limit, self.used = budget, kind, limit, used
        self.requested, self.retry_after = requested, retry_after

    @property
    def never_fits(self) -> bool:
        """The request alone is larger than the limit: waiting does not help, a smaller max_tokens does."""
        return self.requested > self.limit


class BudgetUnavailable(Exception):
    """The shared store cannot be reached and the configuration says fail closed."""


@dataclass(frozen=True)
class ExpiredLease:
    """A lease the sweeper took: ``record`` is the final usage record line when the request had settled (its
    record may not have reached the stream), else None and ``meta`` plus the reserved amounts describe it."""

    request_id: str
    tokens: int
    usd_micro: int
    meta: dict[str, Any]
    record: str | None


class BudgetStore(Protocol):
    async def reserve(self, consumer: str, budgets: Sequence[Budget], tokens: int, usd: float, *,
                      min_tokens: int | None = None, usd_per_token: float = 0.0,
                      lease: Lease | None = None) -> tuple[Reservation, Headroom | None]: ...
    async def settle(self, reservation: Reservation, tokens: int, usd: float,
                     record: str | None = None) -> Headroom | None: ...
    async def release(self, reservation: Reservation, record: str | None = None) -> None: ...
    async def usage(self, consumer: str, budget: Budget) -> tuple[int, float]: ...
    async def close(self) -> None: ...


def _retry_after(window_end: int, now: float) -> int:
    return max(1, math.ceil(window_end - now))


def _headroom(charges: Iterable[Charge], used_tokens: Iterable[int]) -> Headroom | None:
    tightest: tuple[int, int] | None = None
    for charge, used in zip(charges, used_tokens, strict=True):
        if charge.budget.tokens is None:
            continue
        remaining = charge.budget.tokens - used
        if tightest is None or remaining < tightest[1]:
            tightest = (charge.budget.tokens, remaining)
    return Headroom(*tightest) if tightest else None


def _usd_micro(usd: float) -> int:
    return max(0, round(usd * MICRO))


class _Keys:
    """Key per (consumer, budget, window start). The consumer is escaped and wrapped in a Redis Cluster hash
    tag, so all budgets of one consumer land on one slot and one script may touch them together."""

    def __init__(self, prefix: str, clock: Callable[[], float]) -> None:
        self.prefix, self.clock = prefix, clock

    def charges(self, consumer: str, budgets: Sequence[Budget]) -> list[Charge]:
        now = self.clock()
        out = []
        for budget in budgets:
            start, end = window_bounds(budget.window, now)
            key = f"{self.prefix}{{{quote(consumer, safe='')}}}:{quote(budget.name, safe='')}:{budget.window}:{start}"
            out.append(Charge(budget=budget, key=key, window_end=end))
        return out


def _grant(charges: Sequence[Charge], used: Sequence[tuple[int, int]], tokens: int, usd_micro: int,
           floor: int, per_token: float) -> tuple[int, int] | tuple[int, str]:
    """(tokens granted, usd_micro of them), or (index of the budget that cannot fit ``floor``, its kind).
    The USD of a grant is ``usd_micro`` less ``per_token`` for each token not granted. The same arithmetic as
    the Redis script."""
    base = usd_micro - tokens * per_token
    grant = tokens
    for i, (charge, (used_tokens, used_usd)) in enumerate(zip(charges, used, strict=True)):
        if charge.budget.tokens is not None:
            fits = charge.budget.tokens - used_tokens
            if fits < floor:
                return i, "token"
            grant = min(grant, fits)
        limit_usd = charge.budget.usd_micro
        if limit_usd is not None:
            if per_token > 0:
                fits = math.floor((limit_usd - used_usd - base) / per_token)
                if fits < floor:
                    return i, "usd"
                grant = min(grant, fits)
            elif used_usd + usd_micro > limit_usd:
                return i, "usd"
    return grant, max(0, math.floor(base + grant * per_token + 0.5))


def _exceeded(charge: Charge, kind: str, used: tuple[int, int], tokens: int, usd_micro: int,
              now: float) -> BudgetExceeded:
    budget = charge.budget
    if kind == "token":
        return BudgetExceeded(budget, kind, budget.tokens or 0, used[0], tokens, _retry_after(charge.window_end, now))
    return BudgetExceeded(budget, kind, budget.usd or 0.0, used[1] / MICRO, usd_micro / MICRO,
                          _retry_after(charge.window_end, now))
