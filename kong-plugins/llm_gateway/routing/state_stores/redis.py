"""Deployment health in Redis, shared by every Kong node and process: one Lua script per operation, and a local
fallback while Redis is away.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

from redis.exceptions import RedisError

from llm_gateway.routing.state import MINUTE_TTL_S, WARN_EVERY_S, CooldownPolicy, Snapshot, T, _minute, _others
from llm_gateway.routing.state_stores.memory import MemoryRoutingState

log = logging.getLogger("llm_gateway.routing_state")


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


#: how long a process routes on the cooldowns it last read, for aliases whose strategy needs no counts: a
#: deployment another node cooled is skipped here within this much; one this process cooled, at once
COOLDOWN_VIEW_S = 0.5
_VIEWS_KEPT = 1024  # deployment groups whose view is kept (one per alias in use): far more than any config has


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
        # deployment group -> (read at, its cooldowns then): snapshots without counts (see COOLDOWN_VIEW_S)
        self._views: dict[tuple[str, ...], tuple[float, dict[str, float]]] = {}

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

    async def snapshot(self, ids: Sequence[str], counts: bool = True) -> Snapshot:
        """``counts`` False: only cooldowns decide (the alias's strategy needs no in-flight or minute counts),
        and a view read within COOLDOWN_VIEW_S answers without a round trip (routing state is advisory)."""
        if not ids:
            return Snapshot({}, {}, {}, {})
        now = self._clock()
        if not counts:
            group = tuple(ids)
            seen = self._views.get(group)
            if seen is not None and 0 <= now - seen[0] < COOLDOWN_VIEW_S:
                return Snapshot({id: until for id, until in seen[1].items() if until > now}, {}, {}, {})
            snap = await self.snapshot(ids)
            if len(self._views) >= _VIEWS_KEPT:
                self._views.clear()
            self._views[group] = (now, dict(snap.cooling))
            return snap
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

        self._forget_views(id)  # what this process learnt counts at once, not after the view's age
        return await self._run("failure", now, shared, lambda: self.fallback.failure(
            id, group, policy, rate_limited=rate_limited, retry_after=retry_after))

    def _forget_views(self, id: str) -> None:
        for group in [g for g in self._views if id in g]:
            del self._views[group]

    async def success(self, id: str) -> None:
        async def shared() -> None:
            await self._client.delete(self._key(id, "fails"))

        await self._run("success", self._clock(), shared, lambda: self.fallback.success(id))

    async def close(self) -> None:
        return None  # the client is the runtime's, shared with the budget store and the record sink
