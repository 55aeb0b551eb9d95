"""Budgets in Redis, shared by every Kong node and every plugin-server process: each operation is one Lua script
(check-and-reserve is atomic across nodes), reservations hold leases that a sweeper settles if their node dies,
and outcomes Redis could not confirm are cancelled by request id (see accounting/budgets.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from redis.exceptions import NoScriptError

from llm_gateway.accounting.budgets import (
    MICRO,
    Budget,
    BudgetUnavailable,
    ExpiredLease,
    Headroom,
    Lease,
    LeaseRef,
    Reservation,
    _exceeded,
    _headroom,
    _Keys,
    _usd_micro,
)

log = logging.getLogger("llm_gateway.budgets")


# KEYS: the consumer's leases (sorted set: request id -> expiry), lease data (hash: request id -> lease), its
# cancelled request ids (sorted set: request id -> expiry), then one hash per budget. ARGV: tokens, usd_micro,
# floor (fewest tokens worth granting), usd_micro per token not granted, request id ('' : no lease), lease
# expiry, now, lease meta (JSON), then per budget: token limit, usd limit (-1: none), seconds to live (relative,
# so a test clock or a node's skew never makes Redis drop a live window). Either every budget takes the
# reservation or none does. Returns {0, granted tokens, granted usd_micro, used tokens...}, {index, kind (1
# token, 2 usd), used tokens, used usd} when refused, or {-1} when this request was cancelled or its lease
# already ended (Redis ran it late: its request has been answered).
_RESERVE = """
local tokens = tonumber(ARGV[1])
local usd = tonumber(ARGV[2])
local floor_t = tonumber(ARGV[3])
local per = tonumber(ARGV[4])
local rid = ARGV[5]
local expiry = tonumber(ARGV[6])
local now = tonumber(ARGV[7])
if rid ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if expiry <= now or redis.call('ZSCORE', KEYS[3], rid) or redis.call('HEXISTS', KEYS[2], rid) == 1 then
    return {-1}
  end
end
local base = usd - tokens * per
local grant = tokens
local n = #KEYS - 3
for i = 1, n do
  local key = KEYS[i + 3]
  local t = tonumber(redis.call('HGET', key, 't') or '0')
  local u = tonumber(redis.call('HGET', key, 'u') or '0')
  local limit_t = tonumber(ARGV[6 + 3 * i])
  local limit_u = tonumber(ARGV[7 + 3 * i])
  if limit_t >= 0 then
    local fits = limit_t - t
    if fits < floor_t then return {i, 1, t, u} end
    if fits < grant then grant = fits end
  end
  if limit_u >= 0 then
    if per > 0 then
      local fits = math.floor((limit_u - u - base) / per)
      if fits < floor_t then return {i, 2, t, u} end
      if fits < grant then grant = fits end
    elseif u + usd > limit_u then
      return {i, 2, t, u}
    end
  end
end
local cost = math.floor(base + grant * per + 0.5)
if cost < 0 then cost = 0 end
local out = {0, grant, cost}
local keys = {}
for i = 1, n do
  local key = KEYS[i + 3]
  keys[i] = key
  out[#out + 1] = redis.call('HINCRBY', key, 't', string.format('%d', grant))
  redis.call('HINCRBY', key, 'u', string.format('%d', cost))
  redis.call('EXPIRE', key, tonumber(ARGV[8 + 3 * i]))
end
if rid ~= '' then
  redis.call('ZADD', KEYS[1], expiry, rid)
  redis.call('HSET', KEYS[2], rid, cjson.encode({t = grant, u = cost, k = keys, m = ARGV[8]}))
  local ttl = math.ceil(expiry - now) + 3600
  for i = 1, 3 do
    if redis.call('TTL', KEYS[i]) < ttl then redis.call('EXPIRE', KEYS[i], ttl) end
  end
end
return out
"""

# Lua shared by the lease scripts: give an unsettled lease's reservation back to its budget hashes (a hash
# whose window already ended is left alone: recreating it would start a dead window with a negative count).
_GIVE_BACK = """
local function give_back(lease)
  for _, key in ipairs(lease.k) do
    if redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 't', string.format('%d', -lease.t))
      redis.call('HINCRBY', key, 'u', string.format('%d', -lease.u))
    end
  end
end
"""

# KEYS: leases, lease data. ARGV: request id, tokens, usd_micro, the final record ('' : none). Settles once:
# the reservation is replaced by the usage on the hashes it was taken from, and the lease becomes a settled
# one holding the record ("S" .. record) until the record sink has the record in the stream (or is deleted at
# once when there is no record). Returns {0, used tokens...}; {-1} when there is no such lease (already
# settled and forgotten, or swept); {-2} when it was already settled.
_SETTLE = """
local data = redis.call('HGET', KEYS[2], ARGV[1])
if not data then return {-1} end
if string.sub(data, 1, 1) == 'S' then return {-2} end
local lease = cjson.decode(data)
local out = {0}
for i, key in ipairs(lease.k) do
  if redis.call('EXISTS', key) == 1 then
    out[i + 1] = redis.call('HINCRBY', key, 't', string.format('%d', tonumber(ARGV[2]) - lease.t))
    redis.call('HINCRBY', key, 'u', string.format('%d', tonumber(ARGV[3]) - lease.u))
  else
    out[i + 1] = 0
  end
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], 'S' .. ARGV[4])
else
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return out
"""

# KEYS: leases, lease data, cancelled. ARGV: request id, tombstone expiry. For a reservation whose outcome the
# node never learnt: if Redis applied it, give it back and drop the lease; else leave a tombstone, so that a
# reservation Redis runs later is refused. Returns 1 when a lease was given back, else 0.
_CANCEL = _GIVE_BACK + """
local data = redis.call('HGET', KEYS[2], ARGV[1])
if data then
  if string.sub(data, 1, 1) ~= 'S' then give_back(cjson.decode(data)) end
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if redis.call('TTL', KEYS[3]) < 7200 then redis.call('EXPIRE', KEYS[3], 7200) end
return 0
"""

# KEYS: leases, lease data. ARGV: now, most leases to take. Takes the consumer's expired leases: unsettled ones
# give their reservation back. Returns {request id, lease data, ...} (data '' for a lease without data).
_SWEEP = _GIVE_BACK + """
local rids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, rid in ipairs(rids) do
  local data = redis.call('HGET', KEYS[2], rid)
  redis.call('ZREM', KEYS[1], rid)
  redis.call('HDEL', KEYS[2], rid)
  if data and string.sub(data, 1, 1) ~= 'S' then give_back(cjson.decode(data)) end
  out[#out + 1] = rid
  out[#out + 1] = data or ''
end
return out
"""

# KEYS: leases, lease data. ARGV: request id. The record sink wrote the record of this request: its settled
# lease is done. An unsettled lease stays (its settlement is still to come, or the sweeper's to give back).
_FORGET = """
local data = redis.call('HGET', KEYS[2], ARGV[1])
if data and string.sub(data, 1, 1) == 'S' then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS: the reservation's hashes. ARGV: token delta, usd_micro delta. For reservations without a lease. A hash
# whose window already expired is left alone.
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

# the lease index outlives the leases it names by this much
_INDEX_MARGIN_S = 3600
# a window's counters outlive it by this much, so a settlement that arrives just after the end still lands
_GRACE_S = 300
#: settlements and cancellations waiting for Redis, at most (the oldest go first: their leases end soonest)
RETRY_LIMIT = 10_000
RETRY_INITIAL_S, RETRY_MAX_S = 0.2, 5.0
SWEEP_BATCH = 500
SWEEP_MAX_BATCHES = 40  # index entries one sweep pass may take: 20,000 (every node sweeps every 2 s)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _Pending:
    """A lease operation Redis did not confirm: retried until it is, or until ``give_up`` (epoch seconds), when
    the lease has ended and the sweeper has taken over."""

    name: str
    keys: list[str]
    args: list[Any]
    give_up: float


class RedisBudgetStore:
    """Budgets shared by every Kong node pointing at one Redis. ``fail_open`` admits untracked when Redis is
    unreachable (logged); the default refuses with BudgetUnavailable so a limit is never silently void."""

    def __init__(self, client: Any, *, key_prefix: str = "llmgw:budget:", fail_open: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self._client, self._fail_open, self._clock = client, fail_open, clock
        self._prefix = key_prefix
        self._keys = _Keys(key_prefix, clock)
        self._reserve = client.register_script(_RESERVE)
        self._adjust = client.register_script(_ADJUST)
        self._scripts = {name: client.register_script(lua) for name, lua in
                         (("settle", _SETTLE), ("cancel", _CANCEL), ("sweep", _SWEEP), ("forget", _FORGET))}
        self._pending: deque[_Pending] = deque()
        self._index_ttl_until = -math.inf  # when the lease index's TTL, as this process last set it, runs out
        self._retrier: asyncio.Task | None = None
        self.retries_dropped = 0  # lease operations given up (their leases ended: the sweeper took over)
        self._dropped_logged_at = self._settle_warned_at = -math.inf

    # -- keys ----------------------------------------------------------------------------------------------
    def _consumer_tag(self, consumer: str) -> str:
        return f"{self._prefix}{{{quote(consumer, safe='')}}}"

    def _lease_keys(self, tag: str) -> list[str]:
        return [f"{tag}:leases", f"{tag}:lease-data", f"{tag}:cancelled"]

    @property
    def lease_index(self) -> str:
        """Every lease by expiry, across consumers (members ``<consumer tag>\\n<request id>``): what sweepers
        read to find the consumers with expired leases. A hint, written before each lease: never decides."""
        return f"{self._prefix}lease-index"

    # -- admission -----------------------------------------------------------------------------------------
    async def reserve(self, consumer: str, budgets: Sequence[Budget], tokens: int, usd: float, *,
                      min_tokens: int | None = None, usd_per_token: float = 0.0,
                      lease: Lease | None = None) -> tuple[Reservation, Headroom | None]:
        now = self._clock()
        usd_micro = _usd_micro(usd)
        floor = tokens if min_tokens is None else min(tokens, min_tokens)
        charges = self._keys.charges(consumer, budgets)
        tag = self._consumer_tag(consumer)
        lease_keys = self._lease_keys(tag)
        args: list[Any] = [tokens, usd_micro, floor, repr(usd_per_token * MICRO),
                           lease.request_id if lease else "", repr(lease.expiry if lease else 0.0), repr(now),
                           json.dumps(lease.meta if lease else {}, separators=(",", ":"), default=str)]
        for charge in charges:
            limit_usd = charge.budget.usd_micro
            args += [charge.budget.tokens if charge.budget.tokens is not None else -1,
                     limit_usd if limit_usd is not None else -1,
                     max(1, math.ceil(charge.window_end + _GRACE_S - now))]
        try:
            if lease is None:
                result = await self._reserve(keys=lease_keys + [c.key for c in charges], args=args)
            else:
                result = await self._reserve_leased(tag, lease, lease_keys + [c.key for c in charges], args)
        except Exception as exc:  # connection refused, timeout, Redis errors: the store cannot decide
            if lease is not None and charges:  # Redis may still run it, late: make sure it takes nothing then
                self._retry(_Pending("cancel", lease_keys, [lease.request_id, repr(lease.expiry)], lease.expiry))
            if self._fail_open:
                log.warning("budget store unreachable (%s); admitting untracked (budget_fail_open)",
                            type(exc).__name__)
                return Reservation(consumer, tokens, usd_micro, []), None
            raise BudgetUnavailable(type(exc).__name__) from None
        status = int(result[0])
        if status == -1:  # only a request id used twice gets here: refuse it as the store cannot vouch for it
            raise BudgetUnavailable("lease refused")
        if status != 0:
            i, kind = status - 1, "token" if int(result[1]) == 1 else "usd"
            raise _exceeded(charges[i], kind, (int(result[2]), int(result[3])), floor, usd_micro, now)
        ref = LeaseRef(lease_keys[0], lease_keys[1], lease.request_id, lease.expiry) if lease else None
        reservation = Reservation(consumer, int(result[1]), int(result[2]), charges, lease=ref)
        return reservation, _headroom(charges, (int(v) for v in result[3:]))

    async def _reserve_leased(self, tag: str, lease: Lease, keys: list[str], args: list[Any]) -> Any:
        """The index entry, then the reservation, in one round trip. EVALSHA by hand, not redis-py's Script
        in a pipeline, which first asks SCRIPT EXISTS: a second round trip on the admission path.

        The index outlives its leases by an hour; its TTL is pushed out only when this lease would come within
        half an hour of it (about once every half hour per process, not once per request)."""
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            pipe.zadd(self.lease_index, {f"{tag}\n{lease.request_id}": lease.expiry})
            extend = lease.expiry + _INDEX_MARGIN_S / 2 > self._index_ttl_until
            if extend:
                pipe.expire(self.lease_index, math.ceil(lease.expiry - self._clock()) + _INDEX_MARGIN_S)
            pipe.evalsha(self._reserve.sha, len(keys), *keys, *args)
            try:
                result = (await pipe.execute())[-1]
            except NoScriptError:
                if attempt == 2:
                    raise
                await self._client.script_load(_RESERVE)  # a restarted or flushed Redis: once, then again
                self._index_ttl_until = -math.inf  # and the index may be gone with it
                continue
            if extend:
                self._index_ttl_until = lease.expiry + _INDEX_MARGIN_S
            return result
        raise AssertionError("unreachable")

    # -- settlement ----------------------------------------------------------------------------------------
    async def _apply(self, reservation: Reservation, tokens: int, usd_micro: int) -> list[int]:
        if not reservation.charges:
            return []
        result = await self._adjust(keys=[c.key for c in reservation.charges], args=[tokens, usd_micro])
        return [int(v) for v in result]

    async def _settle_lease(self, reservation: Reservation, tokens: int, usd_micro: int,
                            record: str | None) -> list[int] | None:
        """Settle through the lease; on a Redis failure queue the same (idempotent) settlement for retry."""
        assert reservation.lease is not None
        ref = reservation.lease
        keys, args = [ref.leases_key, ref.data_key], [ref.request_id, tokens, usd_micro, record or ""]
        try:
            result = await self._scripts["settle"](keys=keys, args=args)
        except Exception as exc:
            now = time.monotonic()
            if now - self._settle_warned_at >= 10:  # once per 10 s: an outage fails every settlement
                self._settle_warned_at = now
                log.warning("budget settlement failed (%s, request %s); retrying it in the background, with "
                            "%d others", type(exc).__name__, ref.request_id, len(self._pending))
            self._retry(_Pending("settle", keys, args, ref.expiry))
            return None
        return [int(v) for v in result[1:]] if int(result[0]) == 0 else None

    async def settle(self, reservation: Reservation, tokens: int, usd: float,
                     record: str | None = None) -> Headroom | None:
        if reservation.lease is not None:
            used = await self._settle_lease(reservation, tokens, _usd_micro(usd), record)
        else:
            used = await self._apply(reservation, tokens - reservation.tokens, _usd_micro(usd) - reservation.usd_micro)
        return _headroom(reservation.charges, used) if used else None

    async def release(self, reservation: Reservation, record: str | None = None) -> None:
        if reservation.lease is not None:
            await self._settle_lease(reservation, 0, 0, record)
        else:
            await self._apply(reservation, -reservation.tokens, -reservation.usd_micro)

    def forget(self, ref: LeaseRef) -> tuple[str, list[str], list[Any], str]:
        """The script call (sha, keys, args, its Lua) that deletes a settled lease whose record is written: the
        record sink pipelines it right after the record."""
        return self._scripts["forget"].sha, [ref.leases_key, ref.data_key], [ref.request_id], _FORGET

    # -- retries -------------------------------------------------------------------------------------------
    def _dropped(self, why: str) -> None:
        """Count a lease operation given up; logged at most every 10 s (a long outage drops thousands)."""
        self.retries_dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged_at >= 10:
            self._dropped_logged_at = now
            log.error("budget lease operations given up (%s): %d so far; their leases will be swept",
                      why, self.retries_dropped)

    def _retry(self, op: _Pending) -> None:
        if len(self._pending) >= RETRY_LIMIT:
            self._pending.popleft()
            self._dropped("retry queue full")
        self._pending.append(op)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._retrier is None or self._retrier.done():
            self._retrier = loop.create_task(self._retry_loop(), name="llm_gateway.budget-retries")

    async def _retry_loop(self) -> None:
        delay = RETRY_INITIAL_S
        while self._pending:
            await asyncio.sleep(delay)
            while self._pending:
                op = self._pending[0]
                if self._clock() >= op.give_up:
                    self._pending.popleft()
                    self._dropped("their leases ended before Redis answered")
                    continue
                try:
                    await self._scripts[op.name](keys=op.keys, args=op.args)
                except Exception:
                    delay = min(delay * 2, RETRY_MAX_S)
                    break
                self._pending.popleft()
                delay = RETRY_INITIAL_S
        if self._retrier is asyncio.current_task():
            self._retrier = None

    @property
    def pending(self) -> int:
        """Lease operations waiting for Redis."""
        return len(self._pending)

    # -- sweeping ------------------------------------------------------------------------------------------
    async def sweep(self, max_batches: int = SWEEP_MAX_BATCHES) -> list[ExpiredLease]:
        """Take every expired lease (any node's): reservations of requests that never settled come back. Per
        batch of index entries: one round trip for the index, one pipeline for the consumers it names, one to
        trim the index; batches until the index has no expired entry left (or ``max_batches``, so one pass
        stays bounded: the next one continues)."""
        expired: list[ExpiredLease] = []
        for _ in range(max_batches):
            now = self._clock()
            members = await self._client.zrangebyscore(self.lease_index, "-inf", repr(now), start=0,
                                                       num=SWEEP_BATCH)
            if not members:
                break
            tags = list(dict.fromkeys(_decode(m).split("\n", 1)[0] for m in members))
            pipe = self._client.pipeline(transaction=False)
            for tag in tags:
                await self._scripts["sweep"](keys=self._lease_keys(tag)[:2], args=[repr(now), SWEEP_BATCH],
                                             client=pipe)
            results = await pipe.execute()
            await self._client.zrem(self.lease_index, *members)
            for flat in results:
                for rid, data in zip(flat[::2], flat[1::2], strict=True):
                    expired.append(_expired(_decode(rid), _decode(data)))
            if len(members) < SWEEP_BATCH:
                break
        return expired

    async def usage(self, consumer: str, budget: Budget) -> tuple[int, float]:
        (charge,) = self._keys.charges(consumer, [budget])
        tokens, usd_micro = await self._client.hmget(charge.key, ["t", "u"])
        return int(tokens or 0), int(usd_micro or 0) / MICRO

    async def leases(self, consumer: str) -> int:
        """Leases the consumer holds now (settled ones waiting for their record included)."""
        return int(await self._client.zcard(self._lease_keys(self._consumer_tag(consumer))[0]))

    async def close(self) -> None:
        """One last try at what is queued (bounded); the client belongs to the runtime, which closes it."""
        task, self._retrier = self._retrier, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                while self._pending:
                    op = self._pending[0]
                    await self._scripts[op.name](keys=op.keys, args=op.args)
                    self._pending.popleft()


def _expired(request_id: str, data: str) -> ExpiredLease:
    if data.startswith("S"):
        return ExpiredLease(request_id, 0, 0, {}, data[1:])
    try:
        lease = json.loads(data) if data else {}
        meta = json.loads(lease.get("m") or "{}")
    except ValueError:
        lease, meta = {}, {}
    return ExpiredLease(request_id, int(lease.get("t") or 0), int(lease.get("u") or 0),
                        meta if isinstance(meta, dict) else {}, None)
