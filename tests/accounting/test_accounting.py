"""accounting/records.py on its own: usage parsing, estimates, prices and cost (checked against LiteLLM's own
arithmetic), usage records, and the record sink against a real Redis (DB 15, keys under this run's prefix only)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
import redis
import redis.asyncio as aioredis
from litellm.llms.anthropic.chat.transformation import AnthropicConfig
from litellm.types.utils import ModelResponse, Usage
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from llm_gateway.accounting.prices import Prices, cost_usd, prices_for
from llm_gateway.accounting.records import RecordSink, UsageRecord
from llm_gateway.accounting.tokens import (
    TokenUsage,
    estimate_completion_tokens,
    estimate_prompt_tokens,
    estimate_usage,
    from_provider_usage,
)
from llm_gateway.operations.logs import JSONFormatter

REDIS_URL = "redis://127.0.0.1:6379/15"
PREFIX = f"llmgw-test-accounting-{secrets.token_hex(4)}:"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the gateway"}]

OPENAI_USAGE = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
                "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 50, "audio_tokens": 0}}
ANTHROPIC_RAW = {"input_tokens": 100, "output_tokens": 50, "cache_read_input_tokens": 400,
                 "cache_creation_input_tokens": 30}


def _anthropic_normalised(raw: dict = ANTHROPIC_RAW) -> dict:
    """What LiteLLM's Anthropic provider makes of Anthropic's usage (and what providers/chat.py hands us)."""
    return AnthropicConfig().calculate_usage(raw, None).model_dump(exclude_none=True)


# -- usage ---------------------------------------------------------------------------------------------------

def test_openai_usage_with_cached_and_reasoning_tokens() -> None:
    usage = from_provider_usage(OPENAI_USAGE)
    assert usage == TokenUsage(prompt=1000, completion=200, total=1200, cached=400, reasoning=50, estimated=False)


def test_anthropic_usage_as_litellm_normalises_it() -> None:
    normalised = _anthropic_normalised()
    assert normalised["prompt_tokens"] == 530  # LiteLLM folds cache reads and writes into prompt_tokens
    usage = from_provider_usage(normalised)
    assert usage == TokenUsage(prompt=530, completion=50, total=580, cached=400, reasoning=0, estimated=False,
                               cache_creation=30)
    # the same usage, raw from Anthropic (input_tokens excludes the cache), and with only the top-level cache field
    assert from_provider_usage(ANTHROPIC_RAW) == usage
    bare = {"prompt_tokens": 530, "completion_tokens": 50, "cache_read_input_tokens": 400}
    assert from_provider_usage(bare) == TokenUsage(530, 50, 580, 400, 0, False)


def test_other_usage_shapes_and_edge_cases() -> None:
    assert from_provider_usage(None) is None
    assert from_provider_usage({}) is None
    assert from_provider_usage({"unrelated": 3}) is None
    # total defaults to prompt + completion
    assert from_provider_usage({"prompt_tokens": 7, "completion_tokens": 5}).total == 12
    no_total = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": None}
    assert from_provider_usage(no_total).total == 12
    # OpenAI Responses API: input_tokens includes the cached ones
    responses = {"input_tokens": 90, "input_tokens_details": {"cached_tokens": 60}, "output_tokens": 30,
                 "output_tokens_details": {"reasoning_tokens": 20}, "total_tokens": 120}
    assert from_provider_usage(responses) == TokenUsage(90, 30, 120, 60, 20, False)
    # nonsense never raises, and details cannot exceed what they are part of
    odd = {"prompt_tokens": "x", "completion_tokens": -3, "prompt_tokens_details": {"cached_tokens": 99},
           "completion_tokens_details": {"reasoning_tokens": 8}, "total_tokens": float("nan")}
    assert from_provider_usage(odd) == TokenUsage(0, 0, 0, 0, 0, False)
    clamped = {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 99},
               "completion_tokens_details": {"reasoning_tokens": 8}}
    assert from_provider_usage(clamped) == TokenUsage(10, 4, 14, 10, 4, False)
    # a zero usage is a report (the provider said nothing was used), not an absence
    assert from_provider_usage({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}) == \
        TokenUsage(0, 0, 0, 0, 0, False)


def test_estimates_are_litellms_counts_and_marked_estimated() -> None:
    text = "Hello gateway! Here are a few words of completion."
    usage = estimate_usage("gpt-4o-mini", MESSAGES, text)
    assert usage.estimated is True and usage.cached == 0 and usage.reasoning == 0
    assert usage.prompt == litellm.token_counter(model="gpt-4o-mini", messages=MESSAGES)
    assert usage.completion == litellm.token_counter(model="gpt-4o-mini", text=text, count_response_tokens=True)
    assert usage.total == usage.prompt + usage.completion
    assert estimate_usage("gpt-4o-mini", MESSAGES, "").completion == 0
    assert estimate_prompt_tokens("gpt-4o-mini", []) == 0


def test_estimates_never_raise_and_never_fetch() -> None:
    # an image that would be fetched to be sized (detail high) if LiteLLM were allowed to
    image = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png", "detail": "high"}}]}]
    started = time.monotonic()
    assert estimate_prompt_tokens("gpt-4o-mini", image) > 250
    assert time.monotonic() - started < 1
    weird = [{"role": "user", "content": [{"type": "something-new", "payload": {"a": 1}}]}, "not a message"]
    assert estimate_prompt_tokens("gpt-4o-mini", weird) >= 0  # type: ignore[list-item]
    # models LiteLLM would count with a HuggingFace tokenizer (downloaded from the Hub) use tiktoken instead
    for model in ("meta-llama/llama-3-70b-instruct", "claude-haiku-4-5", "command-r"):
        assert estimate_prompt_tokens(model, MESSAGES) > 5


def test_large_prompts_are_extrapolated_closely_at_bounded_cost() -> None:
    words = "The gateway counts tokens; 42 requests, naïve café, {json: [1, 2]} — and some code: x = f(y) * 3.\n"
    messages = [{"role": "user", "content": words * 2000}]  # ~190 kB
    exact = litellm.token_counter(model="gpt-4o-mini", messages=messages)
    estimate_prompt_tokens("gpt-4o-mini", messages)
    started = time.perf_counter()
    estimate = estimate_prompt_tokens("gpt-4o-mini", messages)
    elapsed = time.perf_counter() - started
    assert estimate == pytest.approx(exact, rel=0.03)
    assert elapsed < 0.05  # a few hundred µs here; exact counting of this prompt takes tens of ms
    many = [{"role": "user" if i % 2 else "assistant", "content": f"turn {i}: " + words} for i in range(100)]
    exact = litellm.token_counter(model="gpt-4o-mini", messages=many)
    assert estimate_prompt_tokens("gpt-4o-mini", many) == pytest.approx(exact, rel=0.03)
    completion = words * 500
    exact = litellm.token_counter(model="gpt-4o-mini", text=completion, count_response_tokens=True)
    assert estimate_completion_tokens("gpt-4o-mini", completion) == pytest.approx(exact, rel=0.03)


# -- prices and cost -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["gpt-4o-mini", "openai/gpt-4o-mini"])
def test_prices_come_from_litellms_map_with_or_without_prefix(model: str) -> None:
    entry = litellm.model_cost["gpt-4o-mini"]
    assert prices_for(model) == Prices(entry["input_cost_per_token"], entry["output_cost_per_token"],
                                                  entry["cache_read_input_token_cost"])


def test_unknown_models_have_no_price() -> None:
    assert prices_for("openai/mock-gpt") is None
    assert prices_for("demo/echo") is None
    # a prefixless entry of another provider does not price a model of this one
    assert prices_for("hosted_vllm/gpt-4o-mini") is None
    assert cost_usd(TokenUsage(1, 1, 2, 0, 0, False), None) is None
    assert cost_usd(None, Prices(1.0, 1.0, None)) is None


def test_prices_are_cached() -> None:
    assert prices_for("openai/gpt-4o-mini") is prices_for("openai/gpt-4o-mini")
    override = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    assert prices_for("x/y", override) is prices_for("x/y", dict(override))


def _litellm_cost(model: str, provider: str, usage: Usage) -> float:
    """LiteLLM's cost of a LiteLLM usage object: the same arithmetic its cost tracking applies to every call."""
    prompt_cost, completion_cost = litellm.cost_per_token(
        model=model, custom_llm_provider=provider, prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens, usage_object=usage)
    return prompt_cost + completion_cost


@pytest.mark.filterwarnings("ignore:Item 'summary' on TypedDict")  # pydantic, about LiteLLM's types
def test_cost_equals_litellms_for_gpt_4o_mini_with_cached_and_reasoning_tokens() -> None:
    usage = from_provider_usage(OPENAI_USAGE)
    ours = cost_usd(usage, prices_for("openai/gpt-4o-mini"))
    assert ours == pytest.approx(_litellm_cost("gpt-4o-mini", "openai", Usage(**OPENAI_USAGE)), rel=1e-12)
    response = ModelResponse(model="gpt-4o-mini", usage=Usage(**OPENAI_USAGE))
    assert ours == pytest.approx(litellm.completion_cost(completion_response=response, model="gpt-4o-mini",
                                                         custom_llm_provider="openai"), rel=1e-12)
    # cache reads are cheaper than uncached input, and reasoning tokens are billed within completion
    uncached = TokenUsage(1000, 200, 1200, 0, 50, False)
    no_reasoning = TokenUsage(1000, 200, 1200, 400, 0, False)
    assert cost_usd(uncached, prices_for("openai/gpt-4o-mini")) > ours
    assert cost_usd(no_reasoning, prices_for("openai/gpt-4o-mini")) == ours


@pytest.mark.parametrize("model", ["claude-3-5-haiku-latest", "claude-haiku-4-5"])
def test_cost_equals_litellms_for_claude_with_cache_reads_and_writes(model: str) -> None:
    litellm_usage = AnthropicConfig().calculate_usage(ANTHROPIC_RAW, None)
    usage = from_provider_usage(litellm_usage.model_dump(exclude_none=True))
    prices = prices_for(f"anthropic/{model}")
    if model not in litellm.model_cost:
        # LiteLLM 1.106's map no longer lists the retired 3.5 Haiku alias: then neither side has a price
        assert prices is None
        with pytest.raises(Exception, match="isn't mapped"):
            litellm.cost_per_token(model=model, custom_llm_provider="anthropic", prompt_tokens=1, completion_tokens=1)
        return
    ours = cost_usd(usage, prices)
    assert ours == pytest.approx(_litellm_cost(model, "anthropic", litellm_usage), rel=1e-12)
    response = ModelResponse(model=model, usage=litellm_usage)
    assert ours == pytest.approx(litellm.completion_cost(completion_response=response, model=model,
                                                         custom_llm_provider="anthropic"), rel=1e-12)
    # without cache writes, the brief's formula: (prompt - cached) * input + cached * cache_read + completion * output
    reads_only_usage = AnthropicConfig().calculate_usage({**ANTHROPIC_RAW, "cache_creation_input_tokens": 0}, None)
    reads_only = from_provider_usage(reads_only_usage.model_dump(exclude_none=True))
    entry = litellm.model_cost[model]
    expected = ((reads_only.prompt - reads_only.cached) * entry["input_cost_per_token"]
                + reads_only.cached * entry["cache_read_input_token_cost"]
                + reads_only.completion * entry["output_cost_per_token"])
    assert cost_usd(reads_only, prices) == pytest.approx(expected, rel=1e-12)
    assert cost_usd(reads_only, prices) == pytest.approx(
        _litellm_cost(model, "anthropic", reads_only_usage), rel=1e-12)


def test_overrides_take_precedence_per_field() -> None:
    entry = litellm.model_cost["gpt-4o-mini"]
    partial = prices_for("openai/gpt-4o-mini", {"output_cost_per_token": 1e-5})
    assert partial == Prices(entry["input_cost_per_token"], 1e-5, entry["cache_read_input_token_cost"])
    full = {"input_cost_per_token": 1e-6, "output_cost_per_token": 4e-6, "cache_read_input_token_cost": 2.5e-7}
    assert prices_for("openai/gpt-4o-mini", full) == Prices(1e-6, 4e-6, 2.5e-7)
    # an unknown model is priced by a complete override, and not by a partial one
    assert prices_for("anthropic/mock-claude", full) == Prices(1e-6, 4e-6, 2.5e-7)
    assert prices_for("anthropic/mock-claude", {"input_cost_per_token": 1e-6}) is None
    # None and junk values in an override are ignored; the cache keeps overrides apart
    assert prices_for("openai/gpt-4o-mini", {"input_cost_per_token": None, "x": 1}) == \
        prices_for("openai/gpt-4o-mini")
    usage = TokenUsage(prompt=1000, completion=100, total=1100, cached=200, reasoning=0, estimated=False)
    assert cost_usd(usage, Prices(1e-6, 4e-6, 2.5e-7)) == pytest.approx(
        800 * 1e-6 + 200 * 2.5e-7 + 100 * 4e-6, rel=1e-12)
    # no cache-read price: cached tokens cost the input price
    assert cost_usd(usage, Prices(1e-6, 4e-6, None)) == pytest.approx(1000 * 1e-6 + 100 * 4e-6, rel=1e-12)


# -- records -------------------------------------------------------------------------------------------------

USAGE = TokenUsage(12, 5, 17, 3, 2, False)


def _record(request_id: str | None = None, usage: TokenUsage | None = USAGE, **changes) -> UsageRecord:
    fields = dict(request_id=request_id or secrets.token_hex(8), consumer="alice", consumer_id="8f3a-1c0d",
                  route="chat", alias="chat-default", provider="openai", model="gpt-4o-mini", stream=False,
                  status=200, error_code=None, usage=usage, cost_usd=1.25e-5, latency_ms=123.4567, ttft_ms=None)
    fields.update(changes)
    return UsageRecord(**fields)


def test_record_json_is_flat_and_stable() -> None:
    data = _record("req-1", timestamp=1_700_000_000.5).to_json()
    assert data == {
        "request_id": "req-1", "timestamp": 1_700_000_000.5, "consumer": "alice", "consumer_id": "8f3a-1c0d",
        "route": "chat", "endpoint": "chat.completions", "alias": "chat-default", "provider": "openai",
        "model": "gpt-4o-mini", "stream": False,
        "status": 200, "error_code": None, "prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
        "cached_tokens": 3, "cache_creation_tokens": 0, "reasoning_tokens": 2, "estimated": False,
        "cost_usd": 1.25e-5, "latency_ms": 123.457, "ttft_ms": None, "attempts": 1, "cache_status": "none",
        "truncated": False, "deployment": None, "fallback": None, "complexity_score": None,
        "complexity_choice": None, "lost": False}
    empty = _record(usage=None, cost_usd=None, status=429, error_code="budget_exceeded").to_json()
    assert empty["prompt_tokens"] == empty["total_tokens"] == 0 and empty["estimated"] is False
    assert json.loads(json.dumps(empty)) == empty


class _Lines(logging.Handler):
    """The plugin server's log format, as Kong's error log receives it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JSONFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def usage_lines() -> Iterator[list[str]]:
    handler = _Lines()
    logger = logging.getLogger("llm_gateway.usage")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.setLevel(level)
    logger.removeHandler(handler)


def _logged(lines: list[str]) -> dict[str, dict]:
    records = {}
    for line in lines:
        entry = json.loads(line)  # one JSON object per line, the usage record's fields at its top level
        if entry.pop("event", None) == "usage":
            assert entry.pop("logger") == "llm_gateway.usage" and entry.pop("level") == "INFO" and entry.pop("ts")
            records[entry["request_id"]] = entry
    return records


def test_sink_without_redis_logs_one_json_line_per_record(usage_lines: list[str]) -> None:
    sink = RecordSink()
    record = _record(consumer="o'hara %s \"quoted\"\nnewline")
    sink.emit(record)
    assert len(usage_lines) == 1 and "\n" not in usage_lines[0]
    assert _logged(usage_lines)[record.request_id] == record.to_json()
    assert sink.pending == 0
    asyncio.run(sink.flush())
    asyncio.run(sink.close())


@pytest.fixture
def stream_key() -> Iterator[str]:
    key = f"{PREFIX}usage-{secrets.token_hex(4)}"
    yield key
    redis.Redis.from_url(REDIS_URL).delete(key)


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(250):  # up to 5 s
        if condition():
            return
        await asyncio.sleep(0.02)


def _stream(key: str) -> list[dict[str, str]]:
    entries = redis.Redis.from_url(REDIS_URL, decode_responses=True).xrange(key)
    return [fields for _, fields in entries]


def test_sink_appends_every_record_to_a_redis_stream(stream_key: str, usage_lines: list[str]) -> None:
    records = [_record(), _record(usage=TokenUsage(40, 10, 50, 0, 0, True), stream=True, ttft_ms=80.5),
               _record(usage=None, cost_usd=None, status=429, error_code="budget_exceeded")]

    async def scenario() -> None:
        client = aioredis.from_url(REDIS_URL)
        sink = RecordSink(client, stream=stream_key)
        for record in records[:2]:
            sink.emit(record)
        # the background writer gets them there without a flush
        await _until(lambda: len(_stream(stream_key)) == 2)
        assert len(_stream(stream_key)) == 2
        sink.emit(records[2])
        await sink.flush()
        assert sink.pending == 0 and sink.written == 3 and sink.dropped == 0
        await sink.close()
        await client.aclose()

    asyncio.run(scenario())
    entries = _stream(stream_key)
    assert [e["request_id"] for e in entries] == [r.request_id for r in records]
    assert [json.loads(e["record"]) for e in entries] == [r.to_json() for r in records]
    assert _logged(usage_lines).keys() == {r.request_id for r in records}


def test_sink_batches_many_records_in_pipelines(stream_key: str) -> None:
    async def scenario() -> RecordSink:
        client = aioredis.from_url(REDIS_URL)
        sink = RecordSink(client, stream=stream_key, batch_size=100)
        for _ in range(1000):
            sink.emit(_record())
        await sink.flush()
        await sink.close()
        await client.aclose()
        return sink

    logging.getLogger("llm_gateway.usage").disabled = True
    try:
        sink = asyncio.run(scenario())
    finally:
        logging.getLogger("llm_gateway.usage").disabled = False
    assert sink.written == 1000 and sink.dropped == 0
    assert len(_stream(stream_key)) == 1000


def _unreachable() -> aioredis.Redis:
    """Nothing listens on port 1; no client-side retries, so the sink's own retrying is what is tested."""
    return aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


def test_sink_survives_redis_being_unreachable(usage_lines: list[str], stream_key: str) -> None:
    async def scenario() -> None:
        down = _unreachable()
        sink = RecordSink(down, stream=stream_key, buffer_limit=4, retry_initial=0.05, retry_max=0.1)
        records = [_record() for _ in range(6)]
        started = time.perf_counter()
        for record in records:
            sink.emit(record)  # never raises, never waits for Redis
        assert time.perf_counter() - started < 0.05
        await sink.flush()  # nor does this
        await asyncio.sleep(0.3)  # the background writer retries meanwhile, and fails again
        assert sink.failures >= 2
        assert sink.pending == 4 and sink.dropped == 2  # bounded: the two oldest are gone from the buffer
        assert _logged(usage_lines).keys() == {r.request_id for r in records}  # but every record was logged

        # Redis comes back: the background writer's next retry writes the records kept, in order
        up = aioredis.from_url(REDIS_URL)
        sink.redis = up
        await _until(lambda: sink.written == 4)
        assert sink.pending == 0 and sink.written == 4
        assert [e["request_id"] for e in _stream(stream_key)] == [r.request_id for r in records[2:]]
        await sink.close()
        await up.aclose()
        await down.aclose()

    asyncio.run(scenario())


def test_sink_close_gives_up_on_an_unreachable_redis_without_raising() -> None:
    async def scenario() -> RecordSink:
        down = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # redis-py's own retries too
        sink = RecordSink(down, stream=f"{PREFIX}never", shutdown_timeout=1.0)
        sink.emit(_record())
        sink.emit(_record())
        await sink.close()
        sink.emit(_record())  # after close: logged only
        await down.aclose()
        return sink

    sink = asyncio.run(scenario())
    assert sink.pending == 0 and sink.dropped == 2 and sink.written == 0


def test_hot_path_costs_are_small() -> None:
    """Not a benchmark: a guard against an accidental O(prompt) or uncached lookup on the hot path."""
    usage = from_provider_usage(OPENAI_USAGE)
    override = {"input_cost_per_token": 1e-6, "output_cost_per_token": 4e-6}
    prices_for("openai/gpt-4o-mini", override)
    started = time.perf_counter()
    for _ in range(1000):
        cost_usd(usage, prices_for("openai/gpt-4o-mini", override))
    assert (time.perf_counter() - started) / 1000 < 100e-6
