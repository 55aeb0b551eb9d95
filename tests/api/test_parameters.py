"""The parameter policy, end to end: every request field of OpenAI's ``CreateChatCompletionRequest``, alone,
on an OpenAI-format catalog model, an OpenAI-format model LiteLLM does not know, and an Anthropic deployment.

Each one is either forwarded as sent (OpenAI format: asserted on the body the mock provider received),
translated by LiteLLM (Anthropic: asserted on the translated body), or refused with a 400 that names it. With
the alias's ``drop_params`` it is dropped instead, and ``X-LLM-Dropped-Params`` says so. Nothing reaches the
provider changed without a trace, and nothing is lost silently.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from conftest import ALICE_KEY, MAX_BODY_BYTES, route_to
from kong_harness import KongHarness, PluginServerProcess
from mock_provider import MockProvider
from openai_spec import assert_valid_property, request_properties, require_spec

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
FUNCTION = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}

# one valid value per request field (checked against the spec's own schema), plus what it needs alongside
SAMPLES: dict[str, tuple[Any, dict[str, Any]]] = {
    "temperature": (0.5, {}),
    "top_p": (0.5, {}),
    "presence_penalty": (0.5, {}),
    "frequency_penalty": (0.5, {}),
    "max_tokens": (50, {}),
    "max_completion_tokens": (50, {}),
    "n": (2, {}),
    "seed": (7, {}),
    "stop": (["END"], {}),
    "reasoning_effort": ("low", {}),
    "verbosity": ("low", {}),
    "response_format": ({"type": "json_object"}, {}),
    "tools": ([TOOL], {}),
    "tool_choice": ("auto", {"tools": [TOOL]}),
    "parallel_tool_calls": (False, {"tools": [TOOL]}),
    "functions": ([FUNCTION], {}),
    "function_call": ("auto", {"functions": [FUNCTION]}),
    "user": ("end-user-1", {}),
    "safety_identifier": ("safety-1", {}),
    "prompt_cache_key": ("cache-key-1", {}),
    "prompt_cache_retention": ("24h", {}),
    "prompt_cache_options": ({"ttl": "30m", "mode": "implicit"}, {}),
    "logprobs": (True, {}),
    "top_logprobs": (2, {"logprobs": True}),
    "logit_bias": ({"50256": -100}, {}),
    "metadata": ({"team": "search"}, {}),
    "store": (True, {}),
    "service_tier": ("auto", {}),
    "modalities": (["text"], {}),
    "audio": ({"voice": "alloy", "format": "wav"}, {}),
    "prediction": ({"type": "content", "content": "Hello"}, {}),
    "web_search_options": ({"search_context_size": "low"}, {}),
    "moderation": ({"model": "omni-moderation-latest"}, {}),
}
GATEWAY_FIELDS = {"model", "messages", "stream", "stream_options"}

# LiteLLM knows gpt-4o-mini cannot take these (they exist only for reasoning / GPT-5 models)
CATALOG_REFUSES = {"reasoning_effort", "verbosity"}


def _has_tool(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda body: any(t.get("name") == name for t in body.get("tools") or [])


# what LiteLLM's Anthropic translation of each parameter looks like in the provider body; every other
# parameter must be refused by name on the Anthropic path
ANTHROPIC_TRANSLATIONS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "temperature": lambda b: b.get("temperature") == 0.5,
    "top_p": lambda b: b.get("top_p") == 0.5,
    "max_tokens": lambda b: b.get("max_tokens") == 50,
    "max_completion_tokens": lambda b: b.get("max_tokens") == 50,
    "stop": lambda b: b.get("stop_sequences") == ["END"],
    "tools": _has_tool("get_weather"),
    "tool_choice": lambda b: b.get("tool_choice", {}).get("type") == "auto" and _has_tool("get_weather")(b),
    "parallel_tool_calls": lambda b: b.get("tool_choice", {}).get("disable_parallel_tool_use") is True,
    "user": lambda b: b.get("metadata", {}).get("user_id") == "end-user-1",
    "response_format": lambda b: _has_tool("json_tool_call")(b) or "output_format" in b,
    "service_tier": lambda b: b.get("service_tier") in ("auto", "standard_only"),
    "web_search_options": lambda b: any(str(t.get("type", "")).startswith("web_search") for t in b.get("tools", [])),
}


def parameter_config(mock: MockProvider) -> dict[str, Any]:
    oa, an = mock.openai_base, mock.anthropic_base

    def alias(name: str, model: str, api_base: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, **extra, "deployments": [{"model": model, "api_base": api_base,
                                                        "api_key_env": "MOCK_PROVIDER_KEY"}]}

    return {
        "max_body_bytes": MAX_BODY_BYTES,
        "routing": {"backoff_initial": 0.01, "backoff_max": 0.2},
        "models": [
            alias("catalog", "openai/gpt-4o-mini", oa),
            alias("unknown", "openai/mock-gpt-params", oa),
            alias("anthropic", "anthropic/mock-claude-params", an),
            alias("anthropic-tools", "anthropic/mock-claude-tool-params", an),  # answers by calling a tool
            alias("o3-mini", "openai/o3-mini", oa),
            alias("gpt-5", "openai/gpt-5-mini", oa),
            alias("o3-mini-dropping", "openai/o3-mini", oa, drop_params=True),
            alias("anthropic-dropping", "anthropic/mock-claude-params", an, drop_params=True),
            alias("catalog-dropping", "openai/gpt-4o-mini", oa, drop_params=True),
        ],
    }


@pytest.fixture(scope="module")
def route(plugin_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    with route_to(plugin_server, parameter_config(mock_provider)) as harness:
        yield harness


def send(route: KongHarness, alias: str, marker: str, **params: Any) -> httpx.Response:
    body = {"model": alias, "messages": [{"role": "user", "content": f"Parameter sweep {marker}"}], **params}
    return httpx.post(f"{route.url}/v1/chat/completions", json=body, timeout=30,
                      headers={"apikey": ALICE_KEY, "X-Request-ID": f"client-{marker}"})


def upstream(mock: MockProvider, marker: str) -> dict[str, Any] | None:
    bodies = [r.body for r in mock.requests_with(marker)]
    assert len(bodies) <= 1, "one request, one provider call"
    return bodies[0] if bodies else None


def refused(response: httpx.Response, name: str, *also: str) -> None:
    """A 400 naming ``name`` (or a parameter sent alongside that is refused too: the first is named)."""
    assert response.status_code == 400, f"{name}: {response.status_code} {response.text}"
    error = response.json()["error"]
    assert error["param"] in (name, *also), error
    assert error["code"] == "unsupported_parameter"
    assert name in error["message"] and "litellm" not in error["message"].lower()


def test_every_spec_field_has_a_sample_valid_per_the_spec() -> None:
    """A field OpenAI adds to the schema fails here until the gateway has decided what it does with it."""
    require_spec()
    fields = set(request_properties()) - GATEWAY_FIELDS
    assert fields - set(SAMPLES) == set(), "request fields with no sample in this sweep"
    for name, (value, alongside) in SAMPLES.items():
        assert name in fields, f"{name} is no longer a request field"
        assert_valid_property(name, value)
        for other, other_value in alongside.items():
            assert_valid_property(other, other_value)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_unknown_openai_format_model_gets_every_parameter_as_sent(route: KongHarness, mock_provider: MockProvider,
                                                                  name: str) -> None:
    """A self-hosted OpenAI-compatible server (vLLM, TGI, Ollama): LiteLLM does not know the model, the
    upstream speaks OpenAI, so every parameter goes up exactly as sent ('user' used to be dropped)."""
    value, alongside = SAMPLES[name]
    marker = uuid.uuid4().hex
    response = send(route, "unknown", marker, **{name: value}, **alongside)
    assert response.status_code == 200, response.text
    body = upstream(mock_provider, marker)
    assert body is not None and body[name] == value, f"{name} did not reach the provider as sent: {body}"
    assert "X-LLM-Dropped-Params" not in response.headers


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_catalog_openai_model_forwards_or_refuses_by_name(route: KongHarness, mock_provider: MockProvider,
                                                          name: str) -> None:
    value, alongside = SAMPLES[name]
    marker = uuid.uuid4().hex
    response = send(route, "catalog", marker, **{name: value}, **alongside)
    body = upstream(mock_provider, marker)
    if name in CATALOG_REFUSES:
        refused(response, name)
        assert body is None, "a refused request never reaches the provider"
    else:
        assert response.status_code == 200, response.text
        assert body is not None and body[name] == value, f"{name} did not reach the provider as sent: {body}"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_anthropic_translates_or_refuses_by_name(route: KongHarness, mock_provider: MockProvider,
                                                 name: str) -> None:
    value, alongside = SAMPLES[name]
    marker = uuid.uuid4().hex
    response = send(route, "anthropic", marker, **{name: value}, **alongside)
    body = upstream(mock_provider, marker)
    if name in ANTHROPIC_TRANSLATIONS:
        assert response.status_code == 200, response.text
        assert body is not None and ANTHROPIC_TRANSLATIONS[name](body), f"{name} was not translated: {body}"
    else:
        refused(response, name, *(k for k in alongside if k not in ANTHROPIC_TRANSLATIONS))
        assert body is None


@pytest.mark.parametrize("name", sorted(set(SAMPLES) - set(ANTHROPIC_TRANSLATIONS)))
def test_drop_params_drops_by_name_and_says_so(route: KongHarness, mock_provider: MockProvider,
                                               name: str) -> None:
    value, alongside = SAMPLES[name]
    marker = uuid.uuid4().hex
    response = send(route, "anthropic-dropping", marker, **{name: value}, **alongside)
    assert response.status_code == 200, response.text
    expected = {name, *(k for k in alongside if k not in ANTHROPIC_TRANSLATIONS)}
    assert set(response.headers["X-LLM-Dropped-Params"].split(", ")) == expected
    body = upstream(mock_provider, marker)
    assert body is not None and not expected & set(body)


def test_json_object_reaches_anthropic_as_a_json_answer(route: KongHarness, mock_provider: MockProvider) -> None:
    """json_object used to be dropped on the way to Anthropic (the reply was plain text)."""
    marker = uuid.uuid4().hex
    response = send(route, "anthropic-tools", marker, response_format={"type": "json_object"})
    assert response.status_code == 200, response.text
    body = upstream(mock_provider, marker)
    assert body is not None and (_has_tool("json_tool_call")(body) or "output_format" in body)
    content = response.json()["choices"][0]["message"]["content"]
    assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("alias", "temperature"), [("o3-mini", 0.2), ("gpt-5", 0.7)])
def test_reasoning_model_temperature_is_a_400_naming_it(route: KongHarness, mock_provider: MockProvider,
                                                        alias: str, temperature: float, stream: bool) -> None:
    """Was a 500 internal_error (LiteLLM's UnsupportedParamsError unmapped), which the SDK retried twice."""
    marker = uuid.uuid4().hex
    response = send(route, alias, marker, temperature=temperature, stream=stream)
    refused(response, "temperature")
    assert response.headers["x-should-retry"] == "false"
    assert upstream(mock_provider, marker) is None


def test_reasoning_model_mapping_still_applies(route: KongHarness, mock_provider: MockProvider) -> None:
    """LiteLLM's o-series knowledge is kept: max_tokens becomes max_completion_tokens, temperature 1 passes."""
    marker = uuid.uuid4().hex
    response = send(route, "o3-mini", marker, max_tokens=40, temperature=1, metadata={"k": "v"})
    assert response.status_code == 200, response.text
    body = upstream(mock_provider, marker)
    assert body is not None and body["max_completion_tokens"] == 40 and "max_tokens" not in body
    assert body["metadata"] == {"k": "v"}


def test_drop_params_on_an_o_series_alias(route: KongHarness, mock_provider: MockProvider) -> None:
    marker = uuid.uuid4().hex
    response = send(route, "o3-mini-dropping", marker, temperature=0.2, top_p=0.5, max_tokens=30)
    assert response.status_code == 200, response.text
    assert set(response.headers["X-LLM-Dropped-Params"].split(", ")) == {"temperature", "top_p"}
    body = upstream(mock_provider, marker)
    assert body is not None and "temperature" not in body and "top_p" not in body
    assert body["max_completion_tokens"] == 30
    plain = send(route, "catalog-dropping", uuid.uuid4().hex, temperature=0.2)
    assert plain.status_code == 200 and "X-LLM-Dropped-Params" not in plain.headers
    streamed = send(route, "o3-mini-dropping", uuid.uuid4().hex, temperature=0.2, stream=True)
    assert streamed.status_code == 200 and streamed.headers["X-LLM-Dropped-Params"] == "temperature"


def test_null_means_the_default(route: KongHarness, mock_provider: MockProvider) -> None:
    """service_tier: null (and any null) was refused; it is the parameter's default, so it is not sent on."""
    marker = uuid.uuid4().hex
    response = send(route, "catalog", marker, service_tier=None, store=None, metadata=None)
    assert response.status_code == 200, response.text
    body = upstream(mock_provider, marker)
    assert body is not None and not {"service_tier", "store", "metadata"} & set(body)


def test_client_stream_options_are_forwarded_with_usage(route: KongHarness, mock_provider: MockProvider) -> None:
    marker = uuid.uuid4().hex
    response = send(route, "unknown", marker, stream=True, stream_options={"include_obfuscation": False})
    assert response.status_code == 200
    body = upstream(mock_provider, marker)
    assert body is not None and body["stream_options"] == {"include_obfuscation": False, "include_usage": True}


NEVER_SENT_TO_ANTHROPIC = [  # (what LiteLLM's Anthropic transformation would skip, where, extra messages)
    ("audio part", "messages[0].content[1]",
     [{"role": "user", "content": [{"type": "text", "text": "Listen MARK"},
                                   {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]),
    ("refusal part", "messages[1].content[0]",
     [{"role": "user", "content": "MARK"}, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
      {"role": "user", "content": "please"}]),
    ("participant name", "messages[0].name", [{"role": "user", "name": "ann", "content": "MARK"}]),
    ("assistant audio", "messages[1].audio",
     [{"role": "user", "content": "MARK"}, {"role": "assistant", "content": "ok", "audio": {"id": "audio_1"}},
      {"role": "user", "content": "again"}]),
]


@pytest.mark.parametrize(("case", "where", "messages"), NEVER_SENT_TO_ANTHROPIC,
                         ids=[c[0] for c in NEVER_SENT_TO_ANTHROPIC])
def test_what_anthropic_would_skip_is_refused_or_dropped_by_name(route: KongHarness, mock_provider: MockProvider,
                                                                 case: str, where: str,
                                                                 messages: list[dict[str, Any]]) -> None:
    marker = uuid.uuid4().hex
    messages = json.loads(json.dumps(messages).replace("MARK", marker))
    url = f"{route.url}/v1/chat/completions"
    response = httpx.post(url, timeout=30, headers={"apikey": ALICE_KEY},
                          json={"model": "anthropic", "messages": messages})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == where
    assert upstream(mock_provider, marker) is None
    dropping = httpx.post(url, timeout=30, headers={"apikey": ALICE_KEY},
                          json={"model": "anthropic-dropping", "messages": messages})
    assert dropping.status_code == 200, dropping.text
    assert dropping.headers["X-LLM-Dropped-Params"] == where
    assert upstream(mock_provider, marker) is not None


def test_the_sdk_sees_a_plain_bad_request(route: KongHarness) -> None:
    client = openai.OpenAI(base_url=f"{route.url}/v1", api_key="unused", default_headers={"apikey": ALICE_KEY})
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="anthropic", messages=[{"role": "user", "content": "hi"}], seed=3)
    assert raised.value.body["param"] == "seed"
