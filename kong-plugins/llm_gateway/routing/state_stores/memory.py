"""Deployment health in one process's memory: cooldowns, in-flight marks, this minute's requests and tokens.
No method awaits, so each is atomic on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from llm_gateway.routing.state import SWEEP_EVERY_S, CooldownPolicy, Snapshot, _Failures, _Minute, _minute, _others


class MemoryRoutingState:
    """One process's view. No method awaits, so each is atomic on the event loop. Expired entries are dropped
    as they are met and by a sweep every minute, so deployments removed from the config do not linger."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cool: dict[str, float] = {}
        self._fails: dict[str, _Failures] = {}
        self._in_flight: dict[str, dict[str, float]] = {}  # id -> request id -> expiry
        self._minutes: dict[str, _Minute] = {}
        self._next_sweep = 0.0

    def _now(self) -> float:
        now = self._clock()
        if now >= self._next_sweep or now < self._next_sweep - SWEEP_EVERY_S:  # also when the clock went back
            self._sweep(now)
            self._next_sweep = now + SWEEP_EVERY_S
        return now

    def _sweep(self, now: float) -> None:
        for id in [i for i, until in self._cool.items() if until <= now]:
            del self._cool[id]
        for id in [i for i, f in self._fails.items() if f.expires <= now]:
            del self._fails[id]
        for id in list(self._in_flight):
            self._flights(id, now)
        minute = _minute(now)
        for id in [i for i, m in self._minutes.items() if m.minute != minute]:
            del self._minutes[id]

    def _cooling(self, id: str, now: float) -> float | None:
        until = self._cool.get(id)
        if until is not None and until <= now:
            del self._cool[id]
            return None
        return until

    def _flights(self, id: str, now: float) -> int:
        flights = self._in_flight.get(id)
        if flights is None:
            return 0
        for request_id in [r for r, expiry in flights.items() if expiry <= now]:
            del flights[request_id]
        if not flights:
            del self._in_flight[id]
        return len(flights)

    def _counts(self, id: str, now: float) -> _Minute:
        """This minute's counters, started afresh when the minute turned."""
        minute = _minute(now)
        counts = self._minutes.get(id)
        if counts is None or counts.minute != minute:
            counts = self._minutes[id] = _Minute(minute)
        return counts

    async def snapshot(self, ids: Sequence[str], counts: bool = True) -> Snapshot:
        now = self._now()
        minute = _minute(now)
        cooling, in_flight, requests, tokens = {}, {}, {}, {}
        for id in ids:
            if (until := self._cooling(id, now)) is not None:
                cooling[id] = until
            in_flight[id] = self._flights(id, now)
            counts = self._minutes.get(id)
            if counts is None or counts.minute != minute:
                counts = _Minute(minute)
            requests[id], tokens[id] = counts.requests, counts.tokens
        return Snapshot(cooling, in_flight, requests, tokens)

    async def begin(self, id: str, request_id: str, ttl_s: float) -> None:
        now = self._now()
        self._flights(id, now)
        self._in_flight.setdefault(id, {})[request_id] = now + ttl_s
        self._counts(id, now).requests += 1

    async def end(self, id: str, request_id: str, tokens: int) -> None:
        now = self._now()
        flights = self._in_flight.get(id)
        if flights is not None:
            flights.pop(request_id, None)
            if not flights:
                del self._in_flight[id]
        if tokens > 0:
            self._counts(id, now).tokens += tokens

    async def failure(self, id: str, group: Sequence[str], policy: CooldownPolicy, *, rate_limited: bool = False,
                      retry_after: float | None = None) -> float | None:
        now = self._now()
        fails = self._fails.setdefault(id, _Failures())
        while fails.times and fails.times[0] <= now - policy.window_s:  # a sliding window
            fails.times.popleft()
        fails.times.append(now)
        while len(fails.times) > max(1, policy.allowed_fails):  # only the newest allowed_fails can decide
            fails.times.popleft()
        fails.expires = now + policy.window_s
        if not policy.cools_now(rate_limited) and len(fails.times) < policy.allowed_fails:
            return None
        if not policy.cool_last_healthy and all(self._cooling(o, now) is not None for o in _others(id, group)):
            return None  # the others are all cooling: a failing deployment beats none
        del self._fails[id]
        until = now + policy.duration(rate_limited, retry_after)
        current = self._cooling(id, now)
        if current is not None and current >= until:
            return None  # already cooling at least as long
        self._cool[id] = until
        return until

    async def success(self, id: str) -> None:
        self._fails.pop(id, None)

    async def close(self) -> None:
        return None
