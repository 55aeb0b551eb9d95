"""What happens in Kong in front of our plugin, as kong.yml sets it up: the ways SDKs send their key, Kong's
own refusals in OpenAI's error shape, and the Service's read timeout against the routing deadline.

The harness plays kong.yml's pre-function and key-auth (``tests/kong_harness.py``); the real-Kong tier
(``test_real_kong.py``) holds the same behaviour against Kong itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import yaml

from conftest import ALICE_KEY, gateway_config, route_to
from kong_harness import ERROR_TEMPLATE, KEY_NAMES, KongHarness, PluginServerProcess
from mock_provider import MockProvider

ROOT = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "hi"}]


def _route_plugins() -> dict[str, dict]:
    doc = yaml.safe_load((ROOT / "kong.yml").read_text())
    return {p["name"]: p.get("config") or {} for p in doc["services"][0]["plugins"]}


def test_the_harness_plays_the_shipped_kong_yml() -> None:
    """What the harness assumes of kong.yml: key names in this order, hidden credentials, the bearer hand-off
    in pre-function's access phase."""
    plugins = _route_plugins()
    assert tuple(plugins["key-auth"]["key_names"]) == KEY_NAMES
    assert plugins["key-auth"]["hide_credentials"] is True
    [code] = plugins["pre-function"]["access"]
    for needle in ('get_header("authorization")', 'set_header("apikey", token)', 'clear_header("authorization")',
                   'clear_header("x-api-key")', "[Bb][Ee][Aa][Rr][Ee][Rr]"):
        assert needle in code


def test_kongs_error_template_is_an_openai_and_an_anthropic_error() -> None:
    body = json.loads(ERROR_TEMPLATE % ("No API key found in request", "abc123"))
    assert body["error"] == {"type": "gateway_error", "message": "No API key found in request", "param": None,
                             "code": None}
    assert body["type"] == "error" and body["request_id"] == "abc123"  # Anthropic's envelope, Kong's id


@pytest.mark.parametrize("style", ["apikey header", "bearer token (OpenAI SDK)", "x-api-key (Anthropic SDK)"])
def test_every_sdk_style_of_key_authenticates(kong: KongHarness, style: str) -> None:
    headers = {"apikey header": {"apikey": ALICE_KEY},
               "bearer token (OpenAI SDK)": {"Authorization": f"Bearer {ALICE_KEY}"},
               "x-api-key (Anthropic SDK)": {"x-api-key": ALICE_KEY}}[style]
    response = httpx.post(f"{kong.url}/v1/chat/completions", json={"model": "demo", "messages": HELLO},
                          headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def test_the_openai_sdk_with_only_a_base_url_and_a_key(kong: KongHarness) -> None:
    client = openai.OpenAI(base_url=f"{kong.url}/v1", api_key=ALICE_KEY, max_retries=0)
    assert client.chat.completions.create(model="demo", messages=HELLO).choices[0].message.content


def test_kongs_401_reaches_the_sdks_as_typed_errors(kong: KongHarness) -> None:
    client = openai.OpenAI(base_url=f"{kong.url}/v1", api_key="not-a-consumer-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="demo", messages=HELLO)
    assert caught.value.type == "gateway_error" and caught.value.message
    claude = anthropic.Anthropic(base_url=kong.url, api_key="not-a-consumer-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        claude.messages.create(model="demo", max_tokens=10, messages=HELLO)
    assert refused.value.body["error"]["type"] == "gateway_error"


@pytest.fixture(scope="module")
def echo_upstream(plugin_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    """A route whose Service is the mock provider itself: the mock records exactly what Kong forwarded."""
    harness = KongHarness(plugin_server.socket_path, gateway_config(mock_provider),
                          {ALICE_KEY: {"id": "c1", "username": "alice"}}, service_url=mock_provider.base_url)
    with harness:
        yield harness


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {ALICE_KEY}"}, {"x-api-key": ALICE_KEY},
                                     {"apikey": ALICE_KEY, "x-api-key": ALICE_KEY,
                                      "Authorization": f"Bearer {ALICE_KEY}"}],
                         ids=["bearer", "x-api-key", "all three"])
def test_the_consumers_key_never_travels_past_kong(echo_upstream: KongHarness, mock_provider: MockProvider,
                                                   headers: dict[str, str]) -> None:
    marker = f"front-door-{time.monotonic_ns()}"
    httpx.post(f"{echo_upstream.url}/v1/chat/completions", headers={**headers, "X-Marker": marker},
               json={"model": "demo", "messages": HELLO}, timeout=30)
    [seen] = [r for r in mock_provider.requests if r.headers.get("x-marker") == marker]
    assert ALICE_KEY not in json.dumps(seen.headers)
    assert not {"authorization", "apikey", "x-api-key"} & set(seen.headers)
    assert seen.headers["x-consumer-username"] == "alice"


def test_the_gateway_answers_before_kongs_read_timeout(plugin_server: PluginServerProcess,
                                                       mock_provider: MockProvider) -> None:
    """A Service read_timeout shorter than the routing deadline: the gateway cuts its own deadline to fit, so
    the client gets the gateway's 504 (and a usage record), not Kong's "upstream server is timing out"."""
    config = gateway_config(mock_provider)
    config["models"].append({"name": "hangs", "deployments": [
        {"model": "openai/mock-slow-20000", "api_base": mock_provider.openai_base,
         "api_key_env": "MOCK_PROVIDER_KEY"}]})
    route = route_to(plugin_server, config)
    route.read_timeout_ms = 4000
    with route:
        response = httpx.post(f"{route.url}/v1/chat/completions", headers={"apikey": ALICE_KEY},
                              json={"model": "hangs", "messages": HELLO}, timeout=30)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "provider_timeout"  # ours, not Kong's template
    assert "X-LLM-Attempts" in response.headers
