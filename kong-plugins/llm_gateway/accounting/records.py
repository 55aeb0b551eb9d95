"""The one usage record written per request: to the log (one JSON line) and to a Redis Stream for billing.

``RecordSink.emit`` logs the line and queues the record; a background task writes queued records to Redis in
pipelined batches, off the request path, exactly once per request (a marker key guards replays).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price map at import

from redis.exceptions import NoScriptError

from llm_gateway import wire_json
from llm_gateway.accounting.tokens import TokenUsage

log = logging.getLogger("llm_gateway.accounting")
usage_log = logging.getLogger("llm_gateway.usage")

# --------------------------------------------------------------------------------------------------------------
# Usage records
# --------------------------------------------------------------------------------------------------------------

def cache_status(usage: TokenUsage | None) -> str:
    """The provider's prompt cache as a record reports it (the gateway itself caches no responses): ``hit``
    when part of the prompt was read from cache, ``write`` when it was only written, else ``miss``."""
    if usage is None or usage.estimated:
        return "none"
    if usage.cached:
        return "hit"
    return "write" if usage.cache_creation else "miss"


@dataclass
class UsageRecord:
    """One request, as billing sees it. ``consumer`` is the Kong consumer's username (or id): never a key."""

    request_id: str
    consumer: str | None
    consumer_id: str | None
    route: str | None
    alias: str
    provider: str
    model: str
    stream: bool
    status: int
    error_code: str | None
    usage: TokenUsage | None
    cost_usd: float | None
    latency_ms: float
    ttft_ms: float | None
    attempts: int = 1
    cache_status: str = "none"
    deployment: str | None = None  # the deployment that answered (or the last one tried)
    fallback: str | None = None  # the fallback alias that served, when not the requested one
    complexity_score: float | None = None  # routing aliases: the prompt's score and the alias it chose
    complexity_choice: str | None = None
    truncated: bool = False
    lost: bool = False  # written by a sweeper for a request whose node never settled it: an upper bound
    timestamp: float = field(default_factory=time.time)
    client_request_id: str | None = None  # the client's own X-Request-ID (the gateway's id is request_id)
    endpoint: str = "chat.completions"  # the API the client called (api/registry.py)

    def to_json(self) -> dict[str, Any]:
        """Flat, stable field names; token counts are 0 when nothing was used (``usage`` None);
        ``client_request_id`` only when the client sent its own X-Request-ID."""
        usage = self.usage
        return {
            "request_id": self.request_id,
            "timestamp": round(self.timestamp, 6),
            "consumer": self.consumer,
            "consumer_id": self.consumer_id,
            "route": self.route,
            "endpoint": self.endpoint,
            "alias": self.alias,
            "provider": self.provider,
            "model": self.model,
            "stream": self.stream,
            "status": self.status,
            "error_code": self.error_code,
            "prompt_tokens": usage.prompt if usage else 0,
            "completion_tokens": usage.completion if usage else 0,
            "total_tokens": usage.total if usage else 0,
            "cached_tokens": usage.cached if usage else 0,
            "cache_creation_tokens": usage.cache_creation if usage else 0,
            "reasoning_tokens": usage.reasoning if usage else 0,
            "estimated": usage.estimated if usage else False,
            "cost_usd": self.cost_usd,
            "latency_ms": round(self.latency_ms, 3),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 3),
            "attempts": self.attempts,
            "cache_status": self.cache_status,
            "deployment": self.deployment,
            "fallback": self.fallback,
            "complexity_score": self.complexity_score,
            "complexity_choice": self.complexity_choice,
            "truncated": self.truncated,
            "lost": self.lost,
        } | ({"client_request_id": self.client_request_id} if self.client_request_id else {})


def record_line(record: UsageRecord) -> str | None:
    """The record as the one JSON line the log and the stream carry; None (logged) if it cannot be."""
    try:
        return wire_json.dumps(record.to_json(), default=str).decode()
    except Exception:
        log.exception("could not serialise the usage record of request %s", record.request_id)
        return None


def _hash_tag(name: str) -> str:
    """The part of a key Redis Cluster hashes: a key named ``{<tag>}...`` lands on the stream's slot."""
    start = name.find("{")
    if start >= 0:
        end = name.find("}", start + 1)
        if end > start + 1:
            return name[start + 1:end]
    return name


# KEYS: the stream, this request's "recorded" marker. ARGV: request id, record line, maxlen, marker TTL (s),
# kind ("final" or "lost"). One entry per request id: a record whose marker exists is not written again
# (a retry after a timeout whose first write did land), except that a final record replaces a "lost" one a
# sweeper wrote meanwhile (its entry says so: supersedes=lost). Returns 1 when written, else 0.
_RECORD = """
local seen = redis.call('GET', KEYS[2])
if seen and not (seen == 'lost' and ARGV[5] == 'final') then return 0 end
redis.call('SET', KEYS[2], ARGV[5], 'EX', tonumber(ARGV[4]))
if seen then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'request_id', ARGV[1], 'record', ARGV[2],
             'supersedes', seen)
else
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'request_id', ARGV[1], 'record', ARGV[2])
end
return 1
"""


@dataclass(frozen=True)
class _Entry:
    request_id: str
    line: str
    kind: str  # "final" or "lost"
    lease: Any = None  # budgets.LeaseRef of a settled lease to delete once written
    forget: Any = None  # the budget store's forget(ref): the script call that deletes it


class RecordSink:
    """Writes every record as one JSON log line (logger "llm_gateway.usage", INFO) and, when a Redis client is
    given, to a Redis Stream so billing pipelines can consume every record. Never blocks or fails the
    response path: Redis writes are queued and flushed by a background task (pipelined, batched); on Redis
    failure records are kept in a bounded in-memory buffer and retried; overflow is counted and logged, never
    raised.

    What the stream promises (docs/accounting.md): one entry per request id. Each write is a Lua script that
    sets a ``recorded`` marker (``{<stream>}:recorded:<request id>``, kept ``dedupe_ttl`` seconds) and appends
    only if the marker was not there, so a batch retried after a timeout whose first attempt did land writes
    nothing twice. The one exception is deliberate: a sweeper's ``lost`` record (the request's node died or
    lost Redis until the lease ended) is followed by the real record if that node comes back with it; that
    second entry carries ``supersedes: lost``. Consumers keep the last entry per request id.

    ``redis_client`` is a ``redis.asyncio`` client. Each stream entry has the fields ``request_id`` and
    ``record`` (the same JSON object as the log line). The stream is trimmed approximately (``MAXLEN ~``) to
    ``maxlen`` entries: consumers (``XREADGROUP``) must keep up with that much. ``emit`` must be called on the
    event loop's thread; with no running loop, records wait until ``flush`` is awaited.
    """

    def __init__(self, redis_client: Any = None, stream: str = "llmgw:usage", maxlen: int = 1_000_000, *,
                 buffer_limit: int = 100_000, batch_size: int = 500, retry_initial: float = 0.5,
                 retry_max: float = 30.0, shutdown_timeout: float = 5.0, dedupe_ttl: int = 3600) -> None:
        self.redis = redis_client
        self.stream = stream
        self.maxlen = maxlen
        self.buffer_limit = max(1, buffer_limit)
        self.batch_size = max(1, batch_size)
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.shutdown_timeout = shutdown_timeout
        self.dedupe_ttl = dedupe_ttl
        self.dropped = 0  # records lost to buffer overflow (they are still in the log)
        self.written = 0  # records written to the stream
        self.duplicates = 0  # writes the stream already had (a retried batch that had landed)
        self.failures = 0  # failed batch writes
        self._marker_prefix = f"{{{_hash_tag(stream)}}}:recorded:"
        self._script = redis_client.register_script(_RECORD) if redis_client is not None else None
        self._buffer: deque[_Entry] = deque()
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing = False
        self._closed = False
        self._last_overflow_log = 0.0

    @property
    def pending(self) -> int:
        """Records waiting for Redis."""
        return len(self._buffer)

    def emit(self, record: UsageRecord, *, lease: Any = None, forget: Any = None) -> str | None:
        """Log the record and queue it for the stream: synchronous, no I/O beyond the log handler's. ``lease``
        (with the store's ``forget``) is the settled lease to delete once the record is in the stream. Returns
        the record's JSON line (None if it could not be serialised)."""
        line = record_line(record)
        if line is None:
            return None
        self.emit_line(record.request_id, line, kind="lost" if record.lost else "final", lease=lease,
                       forget=forget)
        return line

    def emit_line(self, request_id: str, line: str, *, kind: str = "final", lease: Any = None,
                  forget: Any = None, log_it: bool = True) -> None:
        """Queue an already serialised record (a sweeper re-writing the record a settled lease kept)."""
        if log_it:
            usage_log.info(line)
        if self.redis is None or self._closed:
            return
        if len(self._buffer) >= self.buffer_limit:
            self._buffer.popleft()  # the oldest goes: its log line remains the record of it
            self._overflowed(1)
        self._buffer.append(_Entry(request_id, line, kind, lease, forget))
        self._kick()

    def _overflowed(self, count: int) -> None:
        self.dropped += count
        now = time.monotonic()
        if now - self._last_overflow_log >= 10:
            self._last_overflow_log = now
            log.error("usage stream buffer full (%d records): %d records dropped from the Redis stream so far "
                      "(still in the usage log)", self.buffer_limit, self.dropped)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The writer's task, wake-up event and lock belong to one event loop (tests run several in turn)."""
        if self._loop is not loop:
            self._loop, self._lock, self._wake, self._task = loop, asyncio.Lock(), asyncio.Event(), None

    def _kick(self) -> None:
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop here: flush() will write them
        self._bind(loop)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._writer(), name="llm_gateway.usage-stream")
        self._wake.set()  # type: ignore[union-attr]

    def _ensure_lock(self) -> asyncio.Lock:
        self._bind(asyncio.get_running_loop())
        assert self._lock is not None
        return self._lock

    async def _writer(self) -> None:
        delay = self.retry_initial
        while not self._closed:
            assert self._wake is not None
            await self._wake.wait()
            self._wake.clear()
            while self._buffer and not self._closed:
                if await self._drain():
                    delay = self.retry_initial
                    break
                await asyncio.sleep(delay)  # Redis is failing: back off, keep the records
                delay = min(delay * 2, self.retry_max)

    async def _write(self, batch: list[_Entry]) -> None:
        """One round trip per batch: EVALSHA by hand (redis-py's Script in a pipeline asks SCRIPT EXISTS first,
        and a batch sent to a Redis that hangs must be the batch it runs late, for the marker to matter)."""
        sha = self._script.sha  # type: ignore[union-attr]
        forgets = [entry.forget(entry.lease) for entry in batch if entry.lease is not None and entry.forget]
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=False)
            for entry in batch:
                pipe.evalsha(sha, 2, self.stream, self._marker_prefix + entry.request_id, entry.request_id,
                             entry.line, self.maxlen, self.dedupe_ttl, entry.kind)
            for forget_sha, keys, args, _ in forgets:
                pipe.evalsha(forget_sha, len(keys), *keys, *args)
            try:
                results = await pipe.execute()
                break
            except NoScriptError:  # a fresh, restarted or flushed Redis: load the scripts, once (idempotent)
                if attempt == 2:
                    raise
                for lua in {_RECORD, *(lua for *_, lua in forgets)}:
                    await self.redis.script_load(lua)
        written = sum(1 for r in results[:len(batch)] if int(r) == 1)
        self.written += written
        self.duplicates += len(batch) - written

    async def _drain(self) -> bool:
        """Write everything buffered, batch by batch; False at the first failed batch (its records go back)."""
        async with self._ensure_lock():
            while self._buffer:
                batch = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
                try:
                    await self._write(batch)
                except asyncio.CancelledError:
                    self._requeue(batch)
                    raise
                except Exception as exc:
                    self._requeue(batch)
                    self.failures += 1
                    self._kick()  # the background writer owns retrying (with backoff), whoever failed here
                    if not self._failing:
                        self._failing = True
                        log.warning("cannot write usage records to Redis stream %s (%s: %s); %d kept for retry",
                                    self.stream, type(exc).__name__, exc, len(self._buffer))
                    return False
                if self._failing:
                    self._failing = False
                    log.warning("usage records reach Redis stream %s again", self.stream)
            return True

    def _requeue(self, batch: list[_Entry]) -> None:
        room = self.buffer_limit - len(self._buffer)
        if room < len(batch):  # newer records arrived meanwhile: the oldest of the batch are the ones dropped
            self._overflowed(len(batch) - max(room, 0))
            batch = batch[len(batch) - max(room, 0):]
        self._buffer.extendleft(reversed(batch))

    async def flush(self) -> None:
        """Write what is buffered now, and wait for a batch the background writer has in flight; on Redis
        failure the records stay buffered (never raises)."""
        if self.redis is None or (not self._buffer and self._lock is None):
            return
        try:
            await self._drain()
        except asyncio.CancelledError:
            raise
        except Exception:  # pragma: no cover - _drain handles Redis errors itself
            log.exception("usage stream flush failed")

    async def close(self) -> None:
        """Stop the background writer and make one last attempt, bounded by ``shutdown_timeout``, at writing what
        is left; what cannot be written is counted as dropped (it remains in the log)."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            if task.get_loop() is asyncio.get_running_loop():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.redis is not None and self._buffer:
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(self.flush(), self.shutdown_timeout)
            if self._buffer:
                self.dropped += len(self._buffer)
                log.error("%d usage records could not be written to Redis stream %s before shutdown (still in "
                          "the usage log)", len(self._buffer), self.stream)
                self._buffer.clear()
