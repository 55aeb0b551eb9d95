"""Retries do not multiply: the gateway retries provider failures itself and tells the SDK not to.

With the OpenAI SDK's default ``max_retries=2``, a rate-limited alias used to take 9 provider calls (3 SDK
attempts x 3 gateway attempts). Every error now carries ``x-should-retry`` (the OpenAI and Anthropic SDKs
obey it before their own status rules): ``false`` after the gateway's own retries and on client errors,
``true`` only where the gateway called no provider and a short ``Retry-After`` says when to come back.
Counted at both ends: SDK attempts through the Kong harness, provider calls at the mock provider.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from conftest import ALICE_KEY, BOB_KEY, MAX_BODY_BYTES, REDIS_URL, mock_alias, route_to
from kong_harness import KongHarness, PluginServerProcess
from llm_gateway.errors import GatewayError, should_retry
from mock_provider import MockProvider

GATEWAY_ATTEMPTS = 2  # retries: 1 on one-deployment aliases


def retry_config(mock: MockProvider) -> dict[str, Any]:
    oa, an = mock.openai_base, mock.anthropic_base

    prefix = f"llmgw-test-retries-{secrets.token_hex(4)}:"
    return {
        "max_body_bytes": MAX_BODY_BYTES,
        "redis": {"url": REDIS_URL, "key_prefix": prefix, "usage_stream": f"{prefix}usage"},
        # backoff_max above the mock's Retry-After: 1, so the router retries the rate-limited deployment;
        # cooldowns off, so each test sees its own attempts
        "routing": {"retries": 1, "backoff_initial": 0.01, "backoff_max": 2,
                    "cooldown": {"allowed_fails": 100}},
        "budgets": [{"name": "bob-minute", "window": "minute", "tokens": 40, "consumers": ["bob"]}],
        "models": [
            mock_alias("rate-limited", "openai/mock-retries-err-429-ra-1", oa),
            mock_alias("failing", "openai/mock-retries-err-500", oa),
            mock_alias("claude-overloaded", "anthropic/mock-retries-claude-err-529", an),
            mock_alias("healthy", "openai/mock-retries-ok", oa),
            mock_alias("claude", "anthropic/mock-retries-claude", an),
        ],
    }


@pytest.fixture(scope="module")
def route(plugin_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    with route_to(plugin_server, retry_config(mock_provider)) as harness:
        yield harness


def sdk(route: KongHarness, key: str = ALICE_KEY) -> openai.OpenAI:
    """The SDK as a new user has it: default max_retries (2)."""
    return openai.OpenAI(base_url=f"{route.url}/v1", api_key="unused", default_headers={"apikey": key})


def provider_calls(mock: MockProvider, marker: str) -> int:
    return len(mock.requests_with(marker))


def hello(marker: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"retry test {marker}"}]


@pytest.mark.parametrize(("alias", "error"), [
    ("rate-limited", openai.RateLimitError),
    ("failing", openai.InternalServerError),
    ("claude-overloaded", openai.InternalServerError),
])
@pytest.mark.parametrize("stream", [False, True])
def test_provider_failures_are_retried_once_by_the_gateway_only(
        route: KongHarness, mock_provider: MockProvider, alias: str, error: type[Exception], stream: bool) -> None:
    marker = uuid.uuid4().hex
    before = len(route.traces)
    with pytest.raises(error) as raised:
        sdk(route).chat.completions.create(model=alias, messages=hello(marker), max_tokens=20, stream=stream)
    response = raised.value.response  # type: ignore[attr-defined]
    assert len(route.traces) - before == 1, "the SDK did not retry"
    assert response.headers["x-should-retry"] == "false"
    assert provider_calls(mock_provider, marker) == GATEWAY_ATTEMPTS == int(response.headers["X-LLM-Attempts"])


def test_client_errors_are_not_retried_and_never_reach_the_provider(route: KongHarness,
                                                                    mock_provider: MockProvider) -> None:
    for alias, extra in (("healthy", {"reasoning_effort": "low", "temperature": 7}), ("claude", {"n": 2}),
                         ("claude", {"messages": [{"role": "user", "content": [{"type": "weird"}]}]})):
        marker = uuid.uuid4().hex
        before = len(route.traces)
        with pytest.raises(openai.BadRequestError) as raised:
            sdk(route).chat.completions.create(**{"model": alias, "messages": hello(marker), **extra})
        assert raised.value.response.headers["x-should-retry"] == "false"
        assert len(route.traces) - before == 1
        assert provider_calls(mock_provider, marker) == 0


def test_a_budget_429_invites_a_retry_when_it_says_when(route: KongHarness) -> None:
    """bob's budget is 40 tokens a minute; near its end a reservation is capped to what is left, and once less
    than the minimum completion is left, the refusal says when to come back and invites the retry."""
    url = f"{route.url}/v1/chat/completions"
    headers = {"apikey": BOB_KEY}
    answers = [httpx.post(url, headers=headers, timeout=30,
                          json={"model": "healthy", "messages": hello("budget"), "max_tokens": 30})
               for _ in range(8)]
    assert answers[0].status_code == 200, answers[0].text
    refused = next((a for a in answers if a.status_code == 429), None)
    assert refused is not None, [a.status_code for a in answers]
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-should-retry"] == "true"


def test_success_and_stream_answers_carry_no_retry_header(route: KongHarness) -> None:
    raw = sdk(route).chat.completions.with_raw_response.create(model="healthy", messages=hello("ok"))
    assert "x-should-retry" not in raw.headers


@pytest.mark.parametrize(("status", "code", "retry_after", "expected"), [
    (503, "config_reloaded", "1", True),
    (503, "gateway_restarting", "1", True),  # Kong failed open while the plugin server restarted
    (429, "budget_exceeded", "42", True),
    (429, "budget_exceeded", "3600", False),  # the SDKs wait at most 60 s: their retry would come too early
    (503, "no_healthy_deployment", "5", True),
    (429, "rate_limit_exceeded", "1", False),  # the router already retried the provider
    (502, "provider_error", None, False),
    (504, "provider_timeout", None, False),
    (400, "unsupported_parameter", None, False),
    (500, "internal_error", None, False),
])
def test_should_retry_rules(status: int, code: str, retry_after: str | None, expected: bool) -> None:
    headers = {"Retry-After": retry_after} if retry_after else {}
    assert should_retry(status, code, headers) is expected
    err = GatewayError(status, "x", code=code, headers=headers)
    assert err.headers["x-should-retry"] == ("true" if expected else "false")
