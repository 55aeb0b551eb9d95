"""Token accounting: what a request used (as the provider reported it, or estimated when it reported nothing),
what that cost, and the one usage record written per request, to the log and to a Redis Stream.

Everything here that runs per request is cheap and never raises into the response path:

* ``from_provider_usage`` reads the provider's OpenAI-shaped usage (and Anthropic's shapes, raw or as LiteLLM
  normalises them) — a few dictionary lookups.
* ``prices_for`` looks a model up in LiteLLM's local price map once per (model, override) and caches it;
  ``cost_usd`` is arithmetic. Costs follow LiteLLM's own arithmetic (``litellm.cost_per_token``) for the
  common case: uncached prompt tokens at the input price, cache reads at the cache-read price, cache writes at
  the cache-write price (Anthropic), completion tokens (reasoning tokens included) at the output price. Not
  modelled: tiered prices above 128k/200k prompt tokens, batch and priority tiers, Anthropic's 1-hour cache
  writes, audio/image token prices, per-request tool fees.
* ``estimate_*`` count tokens with ``litellm.token_counter`` (tiktoken, or the model's own tokenizer where
  LiteLLM has one) — only when nothing was reported, and for budget reservations.
* ``RecordSink.emit`` logs one JSON line and queues the record; a background task writes queued records to
  Redis in pipelined batches, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price map at import

import litellm
from redis.exceptions import NoScriptError

log = logging.getLogger("llm_gateway.accounting")
usage_log = logging.getLogger("llm_gateway.usage")

PRICE_KEYS = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
              "cache_creation_input_token_cost")


# --------------------------------------------------------------------------------------------------------------
# Usage
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one request. ``cached`` (cache reads) and ``cache_creation`` (cache writes, Anthropic) are
    part of ``prompt``; ``reasoning`` is part of ``completion``, as providers bill them."""

    prompt: int
    completion: int
    total: int
    cached: int
    reasoning: int
    estimated: bool
    cache_creation: int = 0


def _count(value: Any) -> int | None:
    """A token count from a usage field: a non-negative int, or None when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return max(0, int(value))


def _detail(usage: Mapping, details_key: str, key: str) -> int | None:
    details = usage.get(details_key)
    return _count(details.get(key)) if isinstance(details, Mapping) else None


def _first(*values: int | None) -> int | None:
    for value in values:
        if value is not None:
            return value
    return None


def from_provider_usage(usage: Mapping | None) -> TokenUsage | None:
    """The provider's report as TokenUsage; None when there is none (or it names no token count at all).

    Accepted shapes:

    * OpenAI: ``prompt_tokens``, ``completion_tokens``, ``total_tokens``, ``prompt_tokens_details.cached_tokens``,
      ``completion_tokens_details.reasoning_tokens``;
    * LiteLLM's normalisation of Anthropic: the same, with ``prompt_tokens`` including cache reads and writes,
      plus top-level ``cache_read_input_tokens`` / ``cache_creation_input_tokens`` and
      ``prompt_tokens_details.cache_creation_tokens``;
    * Anthropic raw: ``input_tokens`` (excluding cache reads and writes), ``output_tokens``,
      ``cache_read_input_tokens``, ``cache_creation_input_tokens``;
    * OpenAI Responses API: ``input_tokens`` (including cached), ``input_tokens_details.cached_tokens``,
      ``output_tokens``, ``output_tokens_details.reasoning_tokens``.
    """
    if not usage or not isinstance(usage, Mapping):
        return None
    cache_read = _count(usage.get("cache_read_input_tokens"))
    cache_write = _count(usage.get("cache_creation_input_tokens"))
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None and (raw_input := _count(usage.get("input_tokens"))) is not None:
        prompt = raw_input + (cache_read or 0) + (cache_write or 0)  # Anthropic's input_tokens excludes them
    completion = _first(_count(usage.get("completion_tokens")), _count(usage.get("output_tokens")))
    total = _count(usage.get("total_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    prompt, completion = prompt or 0, completion or 0
    cached = _first(_detail(usage, "prompt_tokens_details", "cached_tokens"),
                    _detail(usage, "input_tokens_details", "cached_tokens"), cache_read) or 0
    creation = _first(cache_write, _detail(usage, "prompt_tokens_details", "cache_creation_tokens")) or 0
    reasoning = _first(_detail(usage, "completion_tokens_details", "reasoning_tokens"),
                       _detail(usage, "output_tokens_details", "reasoning_tokens")) or 0
    cached = min(cached, prompt)
    creation = min(creation, prompt - cached)
    reasoning = min(reasoning, completion)
    if total is None or (total == 0 and prompt + completion > 0):
        total = prompt + completion
    return TokenUsage(prompt=prompt, completion=completion, total=total, cached=cached, reasoning=reasoning,
                      estimated=False, cache_creation=creation)


# Token estimates run on the event loop, so their cost is bounded whatever the request: up to EXACT_CHARS of text
# (and EXACT_MESSAGES messages) LiteLLM counts the messages exactly; beyond, SAMPLES evenly spaced windows of the
# text, SAMPLE_CHARS in all, are counted and the count is scaled to the whole text, plus LiteLLM's per-message
# overhead. HuggingFace tokenizers are never used: LiteLLM downloads the llama and cohere ones from the Hub on
# first use (a blocking network fetch inside the event loop), and its "anthropic" one is Claude 2's — no closer
# to Claude 3+ than tiktoken, and 5–8 times slower.
EXACT_CHARS = 8192
EXACT_MESSAGES = 16
SAMPLE_CHARS = 8192
SAMPLES = 16
TOKENS_PER_MESSAGE = 4  # LiteLLM's 3 per message, and ~1 for the role
IMAGE_TOKENS = 250  # LiteLLM's DEFAULT_IMAGE_TOKEN_COUNT


def _rough_tokens(text_length: int) -> int:
    return (text_length + 3) // 4  # ~4 characters per token in English text: the fallback of last resort


def rough_tokens(text_length: int) -> int:
    """Tokens of a text known only by its length (~4 characters per token)."""
    return _rough_tokens(max(0, text_length))


@lru_cache(maxsize=1024)
def _custom_tokenizer(model: str) -> dict[str, Any] | None:
    """tiktoken (LiteLLM's choice of encoding for the model) where LiteLLM would pick a HuggingFace tokenizer."""
    try:
        from litellm.utils import huggingface_tokenizer_kind

        hugging_face = huggingface_tokenizer_kind(model) is not None
    except Exception:  # a LiteLLM without that helper: its usual triggers
        lowered = model.lower()
        hugging_face = any(word in lowered for word in ("claude", "llama", "command-r", "replicate"))
    if not hugging_face:
        return None
    try:
        from litellm._lazy_imports import get_default_encoding

        encoding: Any = get_default_encoding()
    except Exception:
        encoding = None  # LiteLLM picks the encoding from the model name on this path anyway
    return {"type": "openai_tokenizer", "tokenizer": encoding}


def _count_text(model: str, text: str) -> int:
    """Tokens of a text, exact up to EXACT_CHARS, extrapolated from evenly spaced samples beyond."""
    if not text:
        return 0
    if len(text) <= EXACT_CHARS:
        sample, scale = text, 1.0
    else:
        width = SAMPLE_CHARS // SAMPLES
        last = len(text) - width
        sample = "".join(text[last * i // (SAMPLES - 1):][:width] for i in range(SAMPLES))
        scale = len(text) / len(sample)
    try:
        counted = litellm.token_counter(model=model, custom_tokenizer=_custom_tokenizer(model), text=sample,
                                        count_response_tokens=True)
    except Exception:
        log.debug("token_counter failed for %s; using a character estimate", model, exc_info=True)
        return _rough_tokens(len(text))
    return round(counted * scale)


def _message_texts(messages: list[dict]) -> tuple[list[str], int]:
    """The texts of a conversation (contents, text parts, tool calls) and its number of images."""
    texts: list[str] = []
    images = 0
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping):
                    if isinstance(part.get("text"), str):
                        texts.append(part["text"])
                    elif part.get("type") == "image_url":
                        images += 1
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():  # any other shape: nothing to count
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                texts.extend(v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str))
        if isinstance(message.get("name"), str):
            texts.append(message["name"])
    return texts, images


def estimate_prompt_tokens(model: str, messages: list[dict]) -> int:
    """Prompt tokens of ``messages`` as LiteLLM counts them (``litellm.token_counter``), at a bounded cost (see
    EXACT_CHARS). Never fetches anything (images count LiteLLM's default 250 tokens), never raises."""
    if not messages or not isinstance(messages, list):
        return 0
    try:
        texts, images = _message_texts(messages)
    except Exception:  # a shape nobody foresaw: a count is not worth a failed response
        log.debug("could not read the messages' texts; estimating from their JSON", exc_info=True)
        return _rough_tokens(len(json.dumps(messages, default=str)))
    chars = sum(map(len, texts))
    try:
        if chars <= EXACT_CHARS and len(messages) <= EXACT_MESSAGES:
            return int(litellm.token_counter(model=model, custom_tokenizer=_custom_tokenizer(model),
                                             messages=messages, use_default_image_token_count=True))
        return (_count_text(model, "\n".join(texts)) + TOKENS_PER_MESSAGE * len(messages) + 3
                + IMAGE_TOKENS * images)
    except Exception:
        log.debug("token_counter failed for %s; using a character estimate", model, exc_info=True)
        return _rough_tokens(chars) + TOKENS_PER_MESSAGE * len(messages) + 3 + IMAGE_TOKENS * images


def warm_up(models: tuple[str, ...] = ("gpt-4o-mini", "gpt-4")) -> None:
    """Load the tiktoken encodings (o200k, cl100k: ~0.2–0.5 s each, once per process) before the first request
    needs them; LiteLLM keeps them for the life of the process."""
    for model in models:
        estimate_prompt_tokens(model, [{"role": "user", "content": "warm up"}])


def estimate_completion_tokens(model: str, text: str) -> int:
    """Tokens of a completion's text (bounded cost, as estimate_prompt_tokens)."""
    return _count_text(model, text)


def estimate_usage(model: str, messages: list[dict], completion_text: str) -> TokenUsage:
    """Usage counted by the gateway, for when the provider reported none: marked ``estimated``."""
    prompt = estimate_prompt_tokens(model, messages)
    completion = estimate_completion_tokens(model, completion_text)
    return TokenUsage(prompt=prompt, completion=completion, total=prompt + completion, cached=0, reasoning=0,
                      estimated=True)


# --------------------------------------------------------------------------------------------------------------
# Prices and cost
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Prices:
    """USD per token. A missing cache price means cache tokens cost the input price."""

    input_per_token: float
    output_per_token: float
    cache_read_per_token: float | None
    cache_creation_per_token: float | None = None


def _price(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def _map_entry(model: str) -> Mapping[str, Any] | None:
    """LiteLLM's price-map entry for a model string, with or without its provider prefix (the prefixless entry
    only if it belongs to that provider, as LiteLLM itself checks)."""
    cost_map = litellm.model_cost
    entry = cost_map.get(model)
    if entry is None and "/" in model:
        provider, _, bare = model.partition("/")
        entry = cost_map.get(bare)
        if entry is not None and not _provider_matches(entry, provider):
            entry = None
    return entry if isinstance(entry, Mapping) else None


def _provider_matches(entry: Mapping[str, Any], provider: str) -> bool:
    try:
        from litellm.utils import _check_provider_match

        return bool(_check_provider_match(dict(entry), provider))
    except Exception:  # a LiteLLM without that helper: the plain rule
        listed = entry.get("litellm_provider")
        return listed is None or listed == provider or str(listed).startswith(provider)


@lru_cache(maxsize=4096)
def _prices(model: str, override: tuple[tuple[str, float], ...]) -> Prices | None:
    entry = _map_entry(model) or {}
    chosen = {key: _price(entry.get(key)) for key in PRICE_KEYS}
    chosen.update(override)
    if chosen["input_cost_per_token"] is None or chosen["output_cost_per_token"] is None:
        return None
    return Prices(input_per_token=chosen["input_cost_per_token"], output_per_token=chosen["output_cost_per_token"],
                  cache_read_per_token=chosen["cache_read_input_token_cost"],
                  cache_creation_per_token=chosen["cache_creation_input_token_cost"])


def prices_for(model: str, override: Mapping | None = None) -> Prices | None:
    """Per-token prices of a LiteLLM model string (``openai/gpt-4o-mini``, ``anthropic/claude-haiku-4-5``),
    from LiteLLM's local price map, each field overridden by ``override`` (``input_cost_per_token``,
    ``output_cost_per_token``, ``cache_read_input_token_cost``, ``cache_creation_input_token_cost``). None when
    the input or output price is unknown. Cached per (model, override): call ``clear_price_cache`` after
    changing ``litellm.model_cost`` at run time."""
    key: tuple[tuple[str, float], ...] = ()
    if override:
        key = tuple(sorted((k, p) for k in PRICE_KEYS if (p := _price(override.get(k))) is not None))
    return _prices(model, key)


def clear_price_cache() -> None:
    _prices.cache_clear()


def cost_usd(usage: TokenUsage | None, prices: Prices | None) -> float | None:
    """USD for ``usage`` at ``prices``: uncached prompt tokens at the input price, cache reads at the cache-read
    price, cache writes at the cache-write price (each the input price when unknown), completion tokens —
    reasoning included — at the output price. None when either is unknown."""
    if usage is None or prices is None:
        return None
    cached = min(usage.cached, usage.prompt)
    creation = min(usage.cache_creation, usage.prompt - cached)
    uncached = usage.prompt - cached - creation
    read_price = prices.input_per_token if prices.cache_read_per_token is None else prices.cache_read_per_token
    write_price = (prices.input_per_token if prices.cache_creation_per_token is None
                   else prices.cache_creation_per_token)
    return (uncached * prices.input_per_token + cached * read_price + creation * write_price
            + usage.completion * prices.output_per_token)


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
        return json.dumps(record.to_json(), separators=(",", ":"), ensure_ascii=False, default=str)
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
