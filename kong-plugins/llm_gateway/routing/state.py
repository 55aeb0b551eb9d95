"""Health of deployments as routing needs it: cooldowns, failure counts, requests in flight, and requests and
tokens in the current fixed UTC minute (for rpm/tpm caps).

Two stores behind one interface: ``MemoryRoutingState`` (one process) and ``RedisRoutingState`` (every Kong node
and plugin-server process pointing at one Redis shares it: a deployment cooled by one node is skipped by all, and
in-flight counts and caps are global). Each operation is one round trip; the ones that read and then write are
one Lua script, so concurrent nodes never both miss a threshold.

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

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from redis.exceptions import RedisError

log = logging.getLogger("llm_gateway.routing_state")

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
    async def snapshot(self, ids: Sequence[str]) -> Snapshot: ...
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

    async def snapshot(self, ids: Sequence[str]) -> Snapshot:
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


# KEYS, per deployment: cooldown, in-flight set, this minute's requests, this minute's tokens. ARGV: now.
# Prunes lapsed in-flight marks; returns per deployment: cooldown end ('' when not cooling), in flight,
# requests, tokens.
_SNAPSHOT = """
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS, 4 do
  local cool = redis.call('GET', KEYS[i])
  if not cool or tonumber(cool) <= now then cool = '' end
  redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', ARGV[1])
  out[#out + 1] = cool
  out[#out + 1] = redis.call('ZCARD', KEYS[i + 1])
  out[#out + 1] = redis.call('GET', KEYS[i + 2]) or '0'
  out[#out + 1] = redis.call('GET', KEYS[i + 3]) or '0'
end
return out
"""

# KEYS: in-flight set, this minute's requests. ARGV: now, expiry, ttl in ms, minute TTL in s, request id.
# The set's TTL only ever grows, so it outlives its longest mark.
_BEGIN = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[5])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: in-flight set, this minute's tokens. ARGV: request id, tokens, minute TTL in s.
_END = """
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('INCRBY', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return 1
"""

# KEYS: this deployment's failures (a sorted set of times), its cooldown, then the cooldowns of the others in its
# group. ARGV: now, window start, window in ms, allowed_fails, a unique member, cool at once (0/1),
# cool_last_healthy (0/1), cooldown end, cooldown in ms.
# Returns the cooldown end when this call cooled the deployment, else false (nil in Python).
_FAILURE = """
local now = tonumber(ARGV[1])
local allowed = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[5])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(math.max(allowed, 1) + 1))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[6] ~= '1' and redis.call('ZCARD', KEYS[1]) < allowed then return false end
if ARGV[7] ~= '1' then
  local serving = false
  for i = 3, #KEYS do
    local cool = redis.call('GET', KEYS[i])
    if not cool or tonumber(cool) <= now then serving = true break end
  end
  if not serving then return false end
end
redis.call('DEL', KEYS[1])
local current = redis.call('GET', KEYS[2])
if current and tonumber(current) >= tonumber(ARGV[8]) then return false end
redis.call('SET', KEYS[2], ARGV[8], 'PX', ARGV[9])
return ARGV[8]
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisRoutingState:
    """Deployment health shared through Redis; answers from ``fallback`` (local state) while Redis is away."""

    def __init__(self, client: Any, key_prefix: str = "llmgw:route:", clock: Callable[[], float] = time.time,
                 fallback: MemoryRoutingState | None = None, *, retry_s: float = 5.0) -> None:
        self._client, self._prefix, self._clock, self._retry_s = client, key_prefix, clock, retry_s
        self.fallback = fallback if fallback is not None else MemoryRoutingState(clock)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._begin = client.register_script(_BEGIN)
        self._end = client.register_script(_END)
        self._failure = client.register_script(_FAILURE)
        self._down_since: float | None = None  # the last Redis error, while we route on local state
        self._warned_at: float | None = None

    def _key(self, id: str, kind: str) -> str:
        return f"{self._prefix}{{{quote(id, safe='')}}}:{kind}"

    def _redis_down(self, now: float) -> bool:
        """Within ``retry_s`` of the last error, do not wait on Redis again (a clock that went back ends it)."""
        return self._down_since is not None and 0 <= now - self._down_since < self._retry_s

    async def _run(self, op: str, now: float, shared: Callable[[], Awaitable[T]],
                   local: Callable[[], Awaitable[T]]) -> T:
        if self._redis_down(now):
            return await local()
        try:
            result = await shared()
        except (RedisError, OSError) as exc:  # refused, timed out, CROSSSLOT, OOM...: route on what we know
            self._down_since = now
            if self._warned_at is None or not 0 <= now - self._warned_at < WARN_EVERY_S:
                self._warned_at = now
                log.warning("routing state: Redis unavailable on %s (%s: %s); routing on this node's local state",
                            op, type(exc).__name__, str(exc)[:200])
            return await local()
        if self._down_since is not None:
            self._down_since = None
            log.warning("routing state: Redis answers again; routing on shared state")
        return result

    async def snapshot(self, ids: Sequence[str]) -> Snapshot:
        if not ids:
            return Snapshot({}, {}, {}, {})
        now = self._clock()
        minute = _minute(now)
        keys: list[str] = []
        for id in ids:
            keys += [self._key(id, "cool"), self._key(id, "inflight"), self._key(id, f"rpm:{minute}"),
                     self._key(id, f"tpm:{minute}")]

        async def shared() -> Snapshot:
            flat = await self._snapshot(keys=keys, args=[repr(now)])
            cooling, in_flight, requests, tokens = {}, {}, {}, {}
            for n, id in enumerate(ids):
                cool, flights, reqs, toks = flat[4 * n: 4 * n + 4]
                if cool:
                    cooling[id] = float(cool)
                in_flight[id], requests[id], tokens[id] = int(flights), int(reqs), int(toks)
            return Snapshot(cooling, in_flight, requests, tokens)

        return await self._run("snapshot", now, shared, lambda: self.fallback.snapshot(ids))

    async def begin(self, id: str, request_id: str, ttl_s: float) -> None:
        now = self._clock()

        async def shared() -> None:
            await self._begin(keys=[self._key(id, "inflight"), self._key(id, f"rpm:{_minute(now)}")],
                              args=[repr(now), repr(now + ttl_s), _ms(ttl_s), MINUTE_TTL_S, request_id])

        await self._run("begin", now, shared, lambda: self.fallback.begin(id, request_id, ttl_s))

    async def end(self, id: str, request_id: str, tokens: int) -> None:
        now = self._clock()

        async def shared() -> None:
            await self._end(keys=[self._key(id, "inflight"), self._key(id, f"tpm:{_minute(now)}")],
                            args=[request_id, max(0, tokens), MINUTE_TTL_S])

        await self._run("end", now, shared, lambda: self.fallback.end(id, request_id, tokens))

    async def failure(self, id: str, group: Sequence[str], policy: CooldownPolicy, *, rate_limited: bool = False,
                      retry_after: float | None = None) -> float | None:
        now = self._clock()
        duration = policy.duration(rate_limited, retry_after)
        until = now + duration
        keys = [self._key(id, "fails"), self._key(id, "cool"), *(self._key(o, "cool") for o in _others(id, group))]
        args = [repr(now), repr(now - policy.window_s), _ms(policy.window_s), policy.allowed_fails,
                f"{now!r}:{secrets.token_hex(4)}", int(policy.cools_now(rate_limited)), int(policy.cool_last_healthy),
                repr(until), _ms(duration)]

        async def shared() -> float | None:
            cooled = await self._failure(keys=keys, args=args)
            return None if cooled is None else float(cooled)

        return await self._run("failure", now, shared, lambda: self.fallback.failure(
            id, group, policy, rate_limited=rate_limited, retry_after=retry_after))

    async def success(self, id: str) -> None:
        async def shared() -> None:
            await self._client.delete(self._key(id, "fails"))

        await self._run("success", self._clock(), shared, lambda: self.fallback.success(id))

    async def close(self) -> None:
        return None  # the client is the runtime's, shared with the budget store and the record sink
