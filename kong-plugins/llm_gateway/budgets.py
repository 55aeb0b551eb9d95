"""Per-consumer token and USD budgets over fixed UTC windows, reserved before the provider call and settled
to the actual usage after it.

Admission is strict, as OpenAI's own limiter counts ``max_tokens``: a request is admitted only when what is
already used plus its reservation fits every budget that applies. Settlement replaces the reservation by the
actual usage (which may be more, when the estimate was low: the provider charged it, so the budget counts it).
Concurrent admissions therefore never exceed a limit by more than one estimate's error.

Two stores behind one interface: ``MemoryBudgetStore`` (one node) and ``RedisBudgetStore`` (several Kong nodes
share a budget; each operation is one Lua script, so check-and-reserve is atomic across nodes). USD amounts are
kept as integer micro-dollars so concurrent increments add exactly.
"""

from __future__ import annotations

import calendar
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

log = logging.getLogger("llm_gateway.budgets")

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


@dataclass
class Reservation:
    consumer: str
    tokens: int
    usd_micro: int
    charges: list[Charge] = field(default_factory=list)


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


class BudgetStore(Protocol):
    async def reserve(self, consumer: str, budgets: Sequence[Budget], tokens: int,
                      usd: float) -> tuple[Reservation, Headroom | None]: ...
    async def settle(self, reservation: Reservation, tokens: int, usd: float) -> Headroom | None: ...
    async def release(self, reservation: Reservation) -> None: ...
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


def _first_breach(charges: Sequence[Charge], used: Sequence[tuple[int, int]], tokens: int,
                  usd_micro: int) -> tuple[int, str] | None:
    for i, (charge, (used_tokens, used_usd)) in enumerate(zip(charges, used, strict=True)):
        if charge.budget.tokens is not None and used_tokens + tokens > charge.budget.tokens:
            return i, "token"
        limit_usd = charge.budget.usd_micro
        if limit_usd is not None and used_usd + usd_micro > limit_usd:
            return i, "usd"
    return None


def _exceeded(charge: Charge, kind: str, used: tuple[int, int], tokens: int, usd_micro: int,
              now: float) -> BudgetExceeded:
    budget = charge.budget
    if kind == "token":
        return BudgetExceeded(budget, kind, budget.tokens or 0, used[0], tokens, _retry_after(charge.window_end, now))
    return BudgetExceeded(budget, kind, budget.usd or 0.0, used[1] / MICRO, usd_micro / MICRO,
                          _retry_after(charge.window_end, now))


class MemoryBudgetStore:
    """One process's budgets. Each operation runs without an await, so it is atomic on the event loop."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._keys = _Keys("", clock)
        self._clock = clock
        self._used: dict[str, list[int]] = {}  # key -> [tokens, usd_micro]
        self._ends: dict[str, int] = {}

    def _prune(self, now: float) -> None:
        for key in [k for k, end in self._ends.items() if end <= now]:
            del self._ends[key], self._used[key]

    async def reserve(self, consumer: str, budgets: Sequence[Budget], tokens: int,
                      usd: float) -> tuple[Reservation, Headroom | None]:
        now = self._clock()
        self._prune(now)
        usd_micro = _usd_micro(usd)
        charges = self._keys.charges(consumer, budgets)
        used = [tuple(self._used.get(c.key, (0, 0))) for c in charges]
        breach = _first_breach(charges, used, tokens, usd_micro)  # type: ignore[arg-type]
        if breach is not None:
            i, kind = breach
            raise _exceeded(charges[i], kind, used[i], tokens, usd_micro, now)  # type: ignore[arg-type]
        for charge in charges:
            counters = self._used.setdefault(charge.key, [0, 0])
            counters[0] += tokens
            counters[1] += usd_micro
            self._ends[charge.key] = charge.window_end
        reservation = Reservation(consumer, tokens, usd_micro, charges)
        return reservation, _headroom(charges, (self._used[c.key][0] for c in charges))

    def _add(self, reservation: Reservation, tokens: int, usd_micro: int) -> list[int]:
        used = []
        for charge in reservation.charges:
            counters = self._used.get(charge.key)
            if counters is not None:  # gone: its window ended, nothing left to correct
                counters[0] += tokens
                counters[1] += usd_micro
            used.append(counters[0] if counters else 0)
        return used

    async def settle(self, reservation: Reservation, tokens: int, usd: float) -> Headroom | None:
        used = self._add(reservation, tokens - reservation.tokens, _usd_micro(usd) - reservation.usd_micro)
        return _headroom(reservation.charges, used)

    async def release(self, reservation: Reservation) -> None:
        self._add(reservation, -reservation.tokens, -reservation.usd_micro)

    async def usage(self, consumer: str, budget: Budget) -> tuple[int, float]:
        (charge,) = self._keys.charges(consumer, [budget])
        tokens, usd_micro = self._used.get(charge.key, (0, 0))
        return tokens, usd_micro / MICRO

    async def close(self) -> None:
        return None


# KEYS: one hash per budget. ARGV: tokens, usd_micro, then per key: token limit, usd limit (-1: none), seconds
# to live (relative, so a test clock or a node's skew never makes Redis drop a live window). Either every
# budget takes the reservation or none does; returns {0, used tokens...} or {index, kind (1 token, 2 usd),
# used tokens, used usd}.
_RESERVE = """
local tokens = tonumber(ARGV[1])
local usd = tonumber(ARGV[2])
local used = {}
for i, key in ipairs(KEYS) do
  local t = tonumber(redis.call('HGET', key, 't') or '0')
  local u = tonumber(redis.call('HGET', key, 'u') or '0')
  local limit_t = tonumber(ARGV[3 * i])
  local limit_u = tonumber(ARGV[3 * i + 1])
  if limit_t >= 0 and t + tokens > limit_t then return {i, 1, t, u} end
  if limit_u >= 0 and u + usd > limit_u then return {i, 2, t, u} end
  used[i] = t
end
local out = {0}
for i, key in ipairs(KEYS) do
  out[i + 1] = redis.call('HINCRBY', key, 't', tokens)
  redis.call('HINCRBY', key, 'u', usd)
  redis.call('EXPIRE', key, tonumber(ARGV[3 * i + 2]))
end
return out
"""

# KEYS: the reservation's hashes. ARGV: token delta, usd_micro delta. A hash whose window already expired is
# left alone (recreating it would start a dead window with a negative or orphan count).
_ADJUST = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    out[i] = redis.call('HINCRBY', key, 't', ARGV[1])
    redis.call('HINCRBY', key, 'u', ARGV[2])
  else
    out[i] = 0
  end
end
return out
"""

# a window's counters outlive it by this much, so a settlement that arrives just after the end still lands
_GRACE_S = 300


class RedisBudgetStore:
    """Budgets shared by every Kong node pointing at one Redis. ``fail_open`` admits untracked when Redis is
    unreachable (logged); the default refuses with BudgetUnavailable so a limit is never silently void."""

    def __init__(self, client: Any, *, key_prefix: str = "llmgw:budget:", fail_open: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self._client, self._fail_open, self._clock = client, fail_open, clock
        self._keys = _Keys(key_prefix, clock)
        self._reserve = client.register_script(_RESERVE)
        self._adjust = client.register_script(_ADJUST)

    async def reserve(self, consumer: str, budgets: Sequence[Budget], tokens: int,
                      usd: float) -> tuple[Reservation, Headroom | None]:
        now = self._clock()
        usd_micro = _usd_micro(usd)
        charges = self._keys.charges(consumer, budgets)
        args: list[int] = [tokens, usd_micro]
        for charge in charges:
            limit_usd = charge.budget.usd_micro
            args += [charge.budget.tokens if charge.budget.tokens is not None else -1,
                     limit_usd if limit_usd is not None else -1,
                     max(1, math.ceil(charge.window_end + _GRACE_S - now))]
        try:
            result = await self._reserve(keys=[c.key for c in charges], args=args)
        except Exception as exc:  # connection refused, timeout, Redis errors: the store cannot decide
            if self._fail_open:
                log.warning("budget store unreachable (%s); admitting untracked (budget_fail_open)",
                            type(exc).__name__)
                return Reservation(consumer, tokens, usd_micro, []), None
            raise BudgetUnavailable(type(exc).__name__) from None
        if int(result[0]) != 0:
            i, kind = int(result[0]) - 1, "token" if int(result[1]) == 1 else "usd"
            raise _exceeded(charges[i], kind, (int(result[2]), int(result[3])), tokens, usd_micro, now)
        reservation = Reservation(consumer, tokens, usd_micro, charges)
        return reservation, _headroom(charges, (int(v) for v in result[1:]))

    async def _apply(self, reservation: Reservation, tokens: int, usd_micro: int) -> list[int]:
        if not reservation.charges:
            return []
        result = await self._adjust(keys=[c.key for c in reservation.charges], args=[tokens, usd_micro])
        return [int(v) for v in result]

    async def settle(self, reservation: Reservation, tokens: int, usd: float) -> Headroom | None:
        used = await self._apply(reservation, tokens - reservation.tokens, _usd_micro(usd) - reservation.usd_micro)
        return _headroom(reservation.charges, used) if used else None

    async def release(self, reservation: Reservation) -> None:
        await self._apply(reservation, -reservation.tokens, -reservation.usd_micro)

    async def usage(self, consumer: str, budget: Budget) -> tuple[int, float]:
        (charge,) = self._keys.charges(consumer, [budget])
        tokens, usd_micro = await self._client.hmget(charge.key, ["t", "u"])
        return int(tokens or 0), int(usd_micro or 0) / MICRO

    async def close(self) -> None:
        return None  # the client belongs to the runtime, which closes it
