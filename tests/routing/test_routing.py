"""Routing end to end, through the harness and the real plugin server to the mock provider: the fault matrix,
fallbacks (general, context window, content policy), strategies, complexity routing, per-consumer access,
and cooldowns shared by two plugin-server processes through Redis.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from conftest import ALICE_KEY, BOB_KEY, PROVIDER_KEY, REDIS_URL, free_port, route_to, wait_for_record
from kong_harness import KongHarness, PluginServerProcess, start_plugin_server
from mock_provider import MockProvider

HELLO = [{"role": "user", "content": "hello"}]
HEALTHY = "openai/mock-gpt-words-3"


def _deployment(model: str, api_base: str, **extra: Any) -> dict[str, Any]:
    """A deployment of the mock provider (extra: name, weight, timeout, price...)."""
    return {"model": model, "api_base": api_base, "api_key_env": "MOCK_PROVIDER_KEY", **extra}


@dataclass(frozen=True)
class Row:
    """One fault: what the first deployment does, and what the client must see."""

    name: str
    first: dict[str, Any]  # the failing deployment (keys: model, and optionally api_base, timeout)
    stream: bool
    status: int
    attempts: int
    answered_by: str | None  # deployment id in X-LLM-Deployment; None when the request failed
    truncated: bool = False
    retry_after: bool = False


def _rows(down: str) -> list[Row]:
    rows = []
    for code, status, attempts in [(400, 400, 1), (401, 200, 2), (403, 200, 2), (404, 200, 2), (408, 200, 2),
                                   (413, 413, 1), (500, 200, 2), (502, 200, 2), (503, 200, 2), (504, 200, 2)]:
        rows.append(Row(f"http-{code}", {"model": f"openai/mock-err-{code}"}, False, status, attempts,
                        "second" if status == 200 else None))
    rows += [
        Row("429-with-retry-after", {"model": "openai/mock-err-429-ra-2"}, False, 200, 2, "second"),
        Row("429-without-retry-after", {"model": "openai/mock-err-429"}, False, 200, 2, "second"),
        Row("connection-refused", {"model": "openai/mock-gpt", "api_base": down}, False, 200, 2, "second"),
        Row("timeout", {"model": "openai/mock-slow-3000", "timeout": 0.3}, False, 200, 2, "second"),
        Row("malformed-json", {"model": "openai/mock-malformed"}, False, 200, 2, "second"),
        Row("stream-cut-before-first-chunk", {"model": "openai/mock-cut-0"}, True, 200, 2, "second"),
        Row("stream-5xx-before-first-chunk", {"model": "openai/mock-err-503"}, True, 200, 2, "second"),
        Row("stream-cut-after-chunks", {"model": "openai/mock-cut-3"}, True, 200, 1, "first", truncated=True),
        Row("slow-drip", {"model": "openai/mock-drip-30-words-8"}, True, 200, 1, "first"),
    ]
    return rows


ROWS = _rows("http://127.0.0.1:1/v1")  # port 1: nothing listens, the connection is refused


def routing_config(mock: MockProvider) -> dict[str, Any]:
    oa = mock.openai_base
    models: list[dict[str, Any]] = []
    for row in ROWS:
        first = _deployment(**{"api_base": oa, "name": "first", **row.first})
        models.append({"name": f"fault-{row.name}", "strategy": "priority",
                       "deployments": [first, _deployment(HEALTHY, oa, name="second")]})
    models += [
        {"name": "solo-429", "deployments": [_deployment("openai/mock-err-429-ra-1", oa)]},
        {"name": "solo-500", "deployments": [_deployment("openai/mock-err-500", oa)]},
        {"name": "healthy", "deployments": [_deployment(HEALTHY, oa)]},
        {"name": "big-context", "deployments": [_deployment("openai/mock-gpt-words-4", oa)]},
        {"name": "lenient", "deployments": [_deployment("openai/mock-gpt-words-5", oa)]},
        {"name": "broken-with-fallback", "deployments": [_deployment("openai/mock-err-500", oa)],
         "fallbacks": ["healthy"]},
        {"name": "small-context", "deployments": [_deployment("openai/mock-ctx", oa)],
         "fallbacks": ["healthy"], "context_window_fallbacks": ["big-context"]},
        {"name": "claude-small-context", "deployments": [_deployment("anthropic/mock-claude-ctx", mock.anthropic_base)],
         "context_window_fallbacks": ["big-context"]},
        {"name": "small-context-no-fallback", "deployments": [_deployment("openai/mock-ctx", oa)],
         "fallbacks": ["healthy"]},
        {"name": "strict", "deployments": [_deployment("openai/mock-policy", oa)],
         "content_policy_fallbacks": ["lenient"]},
        {"name": "weighted", "deployments": [_deployment("openai/mock-gpt-words-1", oa, name="heavy", weight=3),
                                             _deployment("openai/mock-gpt-words-2", oa, name="light", weight=1)]},
        {"name": "fastest", "strategy": "latency",
         "deployments": [_deployment("openai/mock-slow-80", oa, name="slow"),
                         _deployment("openai/mock-gpt", oa, name="fast")]},
        {"name": "cheapest", "strategy": "cost",
         "deployments": [_deployment("openai/mock-gpt-words-6", oa, name="dear",
                                     price={"input_cost_per_token": 1e-5, "output_cost_per_token": 3e-5}),
                         _deployment("openai/mock-gpt-words-7", oa, name="cheap",
                                     price={"input_cost_per_token": 1e-7, "output_cost_per_token": 3e-7})]},
        {"name": "auto", "route_by_complexity": {"strong": "big-context", "weak": "healthy", "threshold": 0.4}},
    ]
    config: dict[str, Any] = {
        "routing": {"retries": 2, "backoff_initial": 0.01, "backoff_max": 1.5, "deadline": 20},
        "model_access": [{"consumers": ["bob"], "models": ["healthy", "auto"]}],
        "models": models,
    }
    return config


@pytest.fixture(scope="module")
def routed(plugin_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    """A second route on the session's plugin server, with the routing config (its own plugin instance)."""
    with route_to(plugin_server, routing_config(mock_provider)) as harness:
        yield harness


def post(harness: KongHarness, model: str, *, key: str = ALICE_KEY, stream: bool = False,
         messages: list[dict[str, Any]] | None = None) -> tuple[httpx.Response, list[str]]:
    """One request; for streams, the SSE data lines as received."""
    body = {"model": model, "messages": messages or HELLO, "stream": stream}
    with httpx.stream("POST", f"{harness.url}/v1/chat/completions", json=body, headers={"apikey": key},
                      timeout=30) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")] if stream else []
        response.read() if not stream else None
    return response, lines


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_fault_matrix(routed: KongHarness, plugin_server: PluginServerProcess, row: Row) -> None:
    response, lines = post(routed, f"fault-{row.name}", stream=row.stream)
    assert response.status_code == row.status, response.text if not row.stream else lines
    assert response.headers["X-LLM-Attempts"] == str(row.attempts)
    assert response.headers.get("X-LLM-Deployment") == row.answered_by
    assert "X-LLM-Fallback" not in response.headers  # deployments of one alias: no fallback alias involved
    if row.status != 200:
        assert response.json()["error"]["code"]
        return
    if row.stream:
        assert lines[-1] == ("data: [DONE]" if not row.truncated else lines[-1])
        if row.truncated:
            assert '"error"' in lines[-1] and lines[-1] != "data: [DONE]"  # explicit error event, no silent cut
        else:
            assert any('"content"' in line for line in lines)
    else:
        assert response.json()["choices"][0]["message"]["content"]
    record = wait_for_record(plugin_server, response.headers["X-Request-ID"])
    assert record["attempts"] == row.attempts and record["deployment"] == row.answered_by
    assert record["truncated"] is row.truncated


def test_retries_honour_retry_after_then_answer_429(routed: KongHarness, mock_provider: MockProvider) -> None:
    """One deployment answering 429 with Retry-After: 1: the last healthy one is never cooled, so it is retried
    after at least a second, twice, then the client gets the 429 with Retry-After."""
    before = sum(1 for r in mock_provider.requests if r.body and r.body.get("model") == "mock-err-429-ra-1")
    response, _ = post(routed, "solo-429")
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    assert response.headers["X-LLM-Attempts"] == "3"
    calls = [r for r in mock_provider.requests if r.body and r.body.get("model") == "mock-err-429-ra-1"][before:]
    assert len(calls) == 3
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.95 for gap in gaps), gaps


def test_transient_errors_are_retried_then_fail_with_502(routed: KongHarness) -> None:
    response, _ = post(routed, "solo-500")
    assert response.status_code == 502 and response.headers["X-LLM-Attempts"] == "3"
    assert response.json()["error"]["code"] == "provider_error"


@pytest.mark.parametrize("stream", [False, True])
def test_fallback_alias_serves_when_every_deployment_fails(routed: KongHarness, stream: bool) -> None:
    response, lines = post(routed, "broken-with-fallback", stream=stream)
    assert response.status_code == 200
    assert response.headers["X-LLM-Fallback"] == "healthy"
    assert response.headers["X-LLM-Attempts"] == "4"  # three tries of the broken one, then the fallback
    if stream:
        assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("alias", ["small-context", "claude-small-context"])
def test_context_window_errors_go_to_their_own_fallback(routed: KongHarness, alias: str) -> None:
    response, _ = post(routed, alias)
    assert response.status_code == 200, response.text
    assert response.headers["X-LLM-Fallback"] == "big-context"  # not the general fallback
    assert response.headers["X-LLM-Attempts"] == "2"  # a too-long prompt is not retried on the same model


def test_context_window_error_without_its_fallback_is_the_clients_400(routed: KongHarness) -> None:
    response, _ = post(routed, "small-context-no-fallback")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_content_policy_refusal_goes_to_its_fallback(routed: KongHarness) -> None:
    response, _ = post(routed, "strict")
    assert response.status_code == 200 and response.headers["X-LLM-Fallback"] == "lenient"


def test_weighted_strategy_follows_weights(routed: KongHarness) -> None:
    seen = Counter(post(routed, "weighted")[0].headers["X-LLM-Deployment"] for _ in range(200))
    assert set(seen) == {"heavy", "light"}
    assert 0.62 <= seen["heavy"] / 200 <= 0.88, seen  # 3:1 expects 75%; bounds about ±4 standard deviations


def test_latency_strategy_prefers_the_fast_deployment(routed: KongHarness) -> None:
    for _ in range(4):  # both get measured (an unmeasured deployment is tried first)
        post(routed, "fastest")
    seen = Counter(post(routed, "fastest")[0].headers["X-LLM-Deployment"] for _ in range(30))
    assert seen["fast"] >= 28, seen


def test_cost_strategy_prefers_the_cheap_deployment(routed: KongHarness) -> None:
    seen = Counter(post(routed, "cheapest")[0].headers["X-LLM-Deployment"] for _ in range(20))
    assert seen == {"cheap": 20}


def test_complexity_routing_sends_hard_prompts_to_the_strong_alias(routed: KongHarness,
                                                                   plugin_server: PluginServerProcess) -> None:
    easy, _ = post(routed, "auto", messages=[{"role": "user", "content": "hi"}])
    assert easy.status_code == 200 and easy.headers["X-LLM-Complexity"].endswith("routed=healthy")
    hard_prompt = ("Prove step by step that this algorithm is correct, analyze its complexity and compare "
                   "the trade-offs with a heap-based design:\n```python\ndef merge(a, b):\n    out = []\n"
                   "    while a and b:\n        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n"
                   "    return out + a + b\n```\n") * 6
    messages = [{"role": "user", "content": "I need help with a proof."},
                {"role": "assistant", "content": "Sure, send it."},
                {"role": "user", "content": hard_prompt}]
    hard, _ = post(routed, "auto", messages=messages)
    assert hard.status_code == 200 and hard.headers["X-LLM-Complexity"].endswith("routed=big-context")
    score = float(hard.headers["X-LLM-Complexity"].split(";")[0])
    assert score >= 0.4 > float(easy.headers["X-LLM-Complexity"].split(";")[0])
    record = wait_for_record(plugin_server, hard.headers["X-Request-ID"])
    assert record["complexity_score"] == pytest.approx(score, abs=1e-3)
    assert record["complexity_choice"] == "big-context" and record["alias"] == "auto"


def test_consumers_only_reach_the_models_they_are_allowed(routed: KongHarness) -> None:
    refused, _ = post(routed, "weighted", key=BOB_KEY)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "model_not_allowed" and error["type"] == "permission_error"
    assert post(routed, "healthy", key=BOB_KEY)[0].status_code == 200
    assert post(routed, "weighted", key=ALICE_KEY)[0].status_code == 200  # alice is not restricted


def test_cooldown_set_by_one_node_is_honoured_by_the_other(tmp_path_factory: pytest.TempPathFactory,
                                                          mock_provider: MockProvider) -> None:
    """Two plugin-server processes (two Kong nodes) share cooldowns through Redis: a deployment cooled by
    node A is not tried by node B."""
    prefix = f"llmgw-test-route-{secrets.token_hex(4)}:"
    oa = mock_provider.openai_base
    failing = f"mock-err-500-node-{secrets.token_hex(3)}"
    config = {
        "redis": {"url": REDIS_URL, "key_prefix": prefix, "usage_stream": f"{prefix}usage"},
        "routing": {"retries": 0, "cooldown": {"allowed_fails": 1, "duration": 60}},
        "models": [{"name": "shared", "strategy": "priority", "deployments": [
            _deployment(f"openai/{failing}", oa, name="flaky"), _deployment(HEALTHY, oa, name="steady")]}],
    }
    servers, harnesses = [], []
    try:
        for node in ("a", "b"):
            socket_path = str(tmp_path_factory.mktemp(f"route-node-{node}") / "llm-gateway.sock")
            servers.append(start_plugin_server(socket_path, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                               env={"MOCK_PROVIDER_KEY": PROVIDER_KEY,
                                                    "LLM_GATEWAY_METRICS_LISTEN": "off"}))
            harnesses.append(route_to(servers[-1], config).start())
        first, _ = post(harnesses[0], "shared")
        assert first.status_code == 200 and first.headers["X-LLM-Attempts"] == "2"  # flaky failed, then cooled
        calls = sum(1 for r in mock_provider.requests if r.body and r.body.get("model") == failing)
        second, _ = post(harnesses[1], "shared")
        assert second.status_code == 200
        assert second.headers["X-LLM-Deployment"] == "steady" and second.headers["X-LLM-Attempts"] == "1"
        assert sum(1 for r in mock_provider.requests if r.body and r.body.get("model") == failing) == calls
    finally:
        for harness in harnesses:
            harness.stop()
        for server in servers:
            server.stop()
        r = redis.Redis.from_url(REDIS_URL)
        if keys := list(r.scan_iter(match=f"{prefix}*")):
            r.delete(*keys)


def test_route_headers_and_record_name_the_deployment(routed: KongHarness, plugin_server: PluginServerProcess) -> None:
    response, _ = post(routed, "healthy")
    assert response.headers["X-LLM-Deployment"] == "healthy#0" and response.headers["X-LLM-Attempts"] == "1"
    record = wait_for_record(plugin_server, response.headers["X-Request-ID"])
    assert json.dumps(record).count(PROVIDER_KEY) == 0 and record["deployment"] == "healthy#0"
