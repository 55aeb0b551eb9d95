"""Token accounting and budgets end to end: what the provider reported is what the records, headers, metrics
and budgets say, for OpenAI and Anthropic wire formats, JSON and streams, including a client that leaves.
"""

from __future__ import annotations

import json
import time

import httpx
import litellm
import openai
import pytest
import redis

from conftest import (
    ALICE_KEY,
    BOB_BUDGET_TOKENS,
    BOB_KEY,
    PRICE,
    REDIS_URL,
    USAGE_STREAM,
    wait_for_record,
)
from kong_harness import KongHarness, PluginServerProcess

HELLO = [{"role": "user", "content": "Say hello to the gateway"}]


def _expected_cost(prompt: int, cached: int, completion: int, price: dict) -> float:
    cache_price = price.get("cache_read_input_token_cost", price["input_cost_per_token"])
    return ((prompt - cached) * price["input_cost_per_token"] + cached * cache_price
            + completion * price["output_cost_per_token"])


def _check_record(record: dict, usage: dict, cost: float) -> None:
    assert record["prompt_tokens"] == usage["prompt_tokens"]
    assert record["completion_tokens"] == usage["completion_tokens"]
    assert record["total_tokens"] == usage["total_tokens"]
    assert record["cached_tokens"] == (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    assert record["reasoning_tokens"] == (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    assert record["estimated"] is False
    assert record["cost_usd"] == pytest.approx(cost, rel=1e-9)


@pytest.mark.parametrize("alias", ["priced-gpt", "priced-claude"])
def test_json_usage_and_cost_are_what_the_provider_reported(
        client: openai.OpenAI, plugin_server: PluginServerProcess, alias: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model=alias, messages=HELLO, max_tokens=50)
    usage = raw.parse().usage.model_dump()
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    assert cached == (3 if alias == "priced-gpt" else 4)  # the mock's report reached the client untouched
    cost = _expected_cost(usage["prompt_tokens"], cached, usage["completion_tokens"], PRICE)
    assert int(raw.headers["X-LLM-Prompt-Tokens"]) == usage["prompt_tokens"]
    assert int(raw.headers["X-LLM-Completion-Tokens"]) == usage["completion_tokens"]
    assert float(raw.headers["X-LLM-Cost-USD"]) == pytest.approx(cost, abs=1e-8)
    record = wait_for_record(plugin_server, raw.headers["X-Request-ID"])
    _check_record(record, usage, cost)
    assert record["consumer"] == "alice" and record["alias"] == alias and record["status"] == 200
    assert record["cache_status"] == "hit" and record["attempts"] == 1


def test_record_names_the_route_kong_scoped_the_plugin_to(client: openai.OpenAI, kong: KongHarness,
                                                          plugin_server: PluginServerProcess) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-mock", messages=HELLO)
    record = wait_for_record(plugin_server, raw.headers["X-Request-ID"])
    assert record["route"] == kong.route_id


@pytest.mark.parametrize("alias", ["priced-gpt", "priced-claude"])
def test_stream_usage_chunk_carries_tokens_and_cost(
        client: openai.OpenAI, plugin_server: PluginServerProcess, alias: str) -> None:
    with client.chat.completions.with_streaming_response.create(
            model=alias, messages=HELLO, max_tokens=50, stream=True,
            stream_options={"include_usage": True}) as raw:
        request_id = raw.headers["X-Request-ID"]
        chunks = [json.loads(line[6:]) for line in raw.iter_lines() if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    cost = _expected_cost(usage["prompt_tokens"], cached, usage["completion_tokens"], PRICE)
    assert usage["cost_usd"] == pytest.approx(cost, rel=1e-6)
    record = wait_for_record(plugin_server, request_id)
    _check_record(record, usage, cost)
    assert record["stream"] is True and record["truncated"] is False and record["ttft_ms"] > 0


def test_cost_follows_litellms_price_map(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
    usage = raw.parse().usage
    price = litellm.model_cost["gpt-4o-mini"]
    cost = (usage.prompt_tokens * price["input_cost_per_token"]
            + usage.completion_tokens * price["output_cost_per_token"])
    assert float(raw.headers["X-LLM-Cost-USD"]) == pytest.approx(cost, abs=1e-8)


def test_records_reach_the_redis_stream(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-mock", messages=HELLO)
    request_id = raw.headers["X-Request-ID"]
    r = redis.Redis.from_url(REDIS_URL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = [fields for _, fields in r.xrange(USAGE_STREAM)]
        found = [e for e in entries if request_id.encode() in b"".join(v for v in e.values())]
        if found:
            break
        time.sleep(0.1)
    assert found, "the usage record never reached the Redis stream"


def test_client_leaving_mid_stream_is_still_accounted(kong: KongHarness, plugin_server: PluginServerProcess) -> None:
    """The provider charged for what it generated before the client left: the record says so (estimated)."""
    received = 0
    with httpx.stream("POST", f"{kong.url}/v1/chat/completions", headers={"apikey": ALICE_KEY}, timeout=30,
                      json={"model": "drip", "messages": HELLO, "stream": True}) as response:
        request_id = response.headers["X-Request-ID"]
        for line in response.iter_lines():
            if '"content"' in line:
                received += 1
            if received == 5:
                break  # the client hangs up after a few chunks
    record = wait_for_record(plugin_server, request_id)
    assert record["truncated"] is True and record["status"] == 499
    assert record["estimated"] is True  # the provider's usage chunk never came: estimated from what was received
    assert 1 <= record["completion_tokens"] < 40


def test_budget_admits_until_exhausted_then_429(kong: KongHarness) -> None:
    seen_remaining = []
    for _ in range(60):  # near the limit reservations are capped to what is left: ~30 requests fit, not ~22
        response = httpx.post(f"{kong.url}/v1/chat/completions", headers={"apikey": BOB_KEY}, timeout=30,
                              json={"model": "gpt-mock", "messages": HELLO, "max_tokens": 100})
        if response.status_code == 429:
            break
        assert response.status_code == 200, response.text
        assert response.headers["X-RateLimit-Limit-Tokens"] == str(BOB_BUDGET_TOKENS)
        seen_remaining.append(int(response.headers["X-RateLimit-Remaining-Tokens"]))
    else:
        pytest.fail("the budget never ran out")
    error = response.json()["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "rate_limit_error"
    assert 1 <= int(response.headers["Retry-After"]) <= 3600  # the hour window resets then
    assert seen_remaining and seen_remaining == sorted(seen_remaining, reverse=True)
    # alice has no budget on this route: unaffected
    ok = httpx.post(f"{kong.url}/v1/chat/completions", headers={"apikey": ALICE_KEY}, timeout=30,
                    json={"model": "gpt-mock", "messages": HELLO, "max_tokens": 100})
    assert ok.status_code == 200 and "X-RateLimit-Limit-Tokens" not in ok.headers


def test_metrics_count_tokens_by_consumer_without_secrets(client: openai.OpenAI,
                                                          plugin_server: PluginServerProcess) -> None:
    client.chat.completions.create(model="gpt-mock", messages=HELLO)
    text = httpx.get(f"http://{plugin_server.metrics}/metrics", timeout=10).text
    tokens = [line for line in text.splitlines()
              if line.startswith("llm_gateway_tokens_total{") and 'consumer="alice"' in line]
    assert any('kind="prompt"' in line and 'alias="gpt-mock"' in line for line in tokens)
    assert "llm_gateway_requests_total{" in text and "llm_gateway_request_duration_seconds_bucket{" in text
    assert ALICE_KEY not in text and BOB_KEY not in text
