"""Budgets in one process's memory: one Kong node, or one process of it (kong/workers.py pins each budgeted
consumer to one process). Each operation runs without an await, so it is atomic on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from llm_gateway.accounting.budgets import (
    MICRO,
    Budget,
    Headroom,
    Lease,
    Reservation,
    _exceeded,
    _grant,
    _headroom,
    _Keys,
    _usd_micro,
)


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

    async def reserve(self, consumer: str, budgets: Sequence[Budget], tokens: int, usd: float, *,
                      min_tokens: int | None = None, usd_per_token: float = 0.0,
                      lease: Lease | None = None) -> tuple[Reservation, Headroom | None]:
        """``lease`` is accepted and ignored: this store's reservations die with the process that holds them."""
        now = self._clock()
        self._prune(now)
        usd_micro = _usd_micro(usd)
        floor = tokens if min_tokens is None else min(tokens, min_tokens)
        charges = self._keys.charges(consumer, budgets)
        used = [tuple(self._used.get(c.key, (0, 0))) for c in charges]
        outcome = _grant(charges, used, tokens, usd_micro, floor, usd_per_token * MICRO)  # type: ignore[arg-type]
        if isinstance(outcome[1], str):
            i, kind = outcome
            raise _exceeded(charges[i], kind, used[i], floor, usd_micro, now)  # type: ignore[arg-type]
        tokens, usd_micro = outcome  # type: ignore[assignment]
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

    async def settle(self, reservation: Reservation, tokens: int, usd: float,
                     record: str | None = None) -> Headroom | None:
        used = self._add(reservation, tokens - reservation.tokens, _usd_micro(usd) - reservation.usd_micro)
        return _headroom(reservation.charges, used)

    async def release(self, reservation: Reservation, record: str | None = None) -> None:
        self._add(reservation, -reservation.tokens, -reservation.usd_micro)

    async def usage(self, consumer: str, budget: Budget) -> tuple[int, float]:
        (charge,) = self._keys.charges(consumer, [budget])
        tokens, usd_micro = self._used.get(charge.key, (0, 0))
        return tokens, usd_micro / MICRO

    async def close(self) -> None:
        return None
