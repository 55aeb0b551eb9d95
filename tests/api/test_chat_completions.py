"""End to end: the OpenAI SDK → the Kong-side harness → the real plugin server → LiteLLM → the mock provider.

Nothing here is mocked but the providers, which are real HTTP servers speaking their wire formats.
"""

from __future__ import annotations

import itertools
import json

import httpx
import openai
import pytest

from conftest import ALICE_KEY, BOB_KEY, MAX_BODY_BYTES, gateway_config, mock_alias, route_to
from kong_harness import KongHarness, PluginServerProcess
from mock_provider import MockProvider

HELLO = [{"role": "user", "content": "Say hello to the gateway"}]


def test_json_completion_through_kong(client: openai.OpenAI, kong: KongHarness,
                                      mock_provider: MockProvider) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-mock", messages=HELLO)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello from mock-gpt: Say hello to the gateway"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 8
    assert raw.headers["X-LLM-Provider"] == "openai"
    assert raw.headers["X-LLM-Model"] == "mock-gpt"
    assert raw.headers["X-Request-ID"] == raw.headers["X-Kong-Request-Id"]  # Kong's request id
    # the access phase's hand-off: HandleEvent, then one Step per PDK call (consumer, set_header), and on an
    # instance's first request one more (the Service's read timeout)
    assert kong.last_trace.count("plugin.HandleEvent") == 1
    steps = [m for m in kong.last_trace if m != "plugin.StartInstance"]
    assert len(steps) == (4 if "plugin.StartInstance" in kong.last_trace else 3), steps


def test_stream_through_kong(client: openai.OpenAI, mock_provider: MockProvider) -> None:
    mock_provider.clear()
    with client.chat.completions.with_streaming_response.create(model="gpt-mock", messages=HELLO,
                                                                stream=True) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["X-LLM-Model"] == "mock-gpt"
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello from mock-gpt: Say hello to the gateway"
    assert all("usage" not in c for c in chunks), "the client did not ask for usage"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # usage is always requested upstream, so the gateway can account for every stream
    upstream = mock_provider.requests_for("mock-gpt")[-1].body
    assert upstream["stream_options"] == {"include_usage": True}


def test_stream_passes_usage_when_asked(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="gpt-mock", messages=HELLO, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert usage_chunks[0].choices == []
    assert usage_chunks[0].usage.prompt_tokens == 5
    assert usage_chunks[0].usage.completion_tokens == 8


def test_anthropic_is_normalised_to_openai(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="claude-mock", messages=HELLO, max_tokens=50)
    completion = raw.parse()
    assert raw.headers["X-LLM-Provider"] == "anthropic"
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello from mock-claude: Say hello to the gateway"
    assert completion.usage.completion_tokens == 8
    stream = client.chat.completions.create(model="claude-mock", messages=HELLO, max_tokens=50, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from mock-claude: Say hello to the gateway"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_tool_calls_round_trip(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    for model in ("gpt-tools", "claude-tools"):
        completion = client.chat.completions.create(model=model, messages=HELLO, tools=tools, max_tokens=50,
                                                    tool_choice="auto")
        call = completion.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert completion.choices[0].finish_reason == "tool_calls"


def test_parameters_pass_through_to_the_provider(client: openai.OpenAI, mock_provider: MockProvider) -> None:
    mock_provider.clear()
    schema = {"name": "answer", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, temperature=0.2, top_p=0.9, stop=["\n\n"], max_tokens=64,
        max_completion_tokens=64, user="end-user-42",
        response_format={"type": "json_schema", "json_schema": schema},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="none",
    )
    sent = mock_provider.requests_for("gpt-4o-mini")[-1].body
    assert sent["temperature"] == 0.2 and sent["top_p"] == 0.9 and sent["stop"] == ["\n\n"]
    assert sent["max_tokens"] == 64 and sent["max_completion_tokens"] == 64
    assert sent["user"] == "end-user-42"
    assert sent["response_format"] == {"type": "json_schema", "json_schema": schema}
    assert sent["tools"][0]["function"]["name"] == "f" and sent["tool_choice"] == "none"
    client.chat.completions.create(model="gpt-mock", messages=HELLO, response_format={"type": "json_object"})
    assert mock_provider.requests_for("mock-gpt")[-1].body["response_format"] == {"type": "json_object"}
    client.chat.completions.create(model="o3-mini", messages=HELLO, reasoning_effort="low")
    assert mock_provider.requests_for("o3-mini")[-1].body["reasoning_effort"] == "low"


def test_a_parameter_the_model_does_not_support_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, reasoning_effort="low")
    error = raised.value.body
    assert error["code"] == "unsupported_parameter"
    assert "reasoning_effort" in error["message"] and "litellm" not in error["message"].lower()


def test_demo_provider_needs_no_key(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="demo", messages=HELLO)
    assert raw.headers["X-LLM-Provider"] == "demo"
    assert "demo provider" in raw.parse().choices[0].message.content
    text = "".join(c.choices[0].delta.content or "" for c in
                   client.chat.completions.create(model="demo", messages=HELLO, stream=True) if c.choices)
    assert "You said: Say hello to the gateway" in text


def _post(kong: KongHarness, body: bytes | str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{kong.url}/v1/chat/completions", content=body, timeout=30,
                      headers={"apikey": ALICE_KEY, "Content-Type": "application/json", **(headers or {})})


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


BAD_REQUESTS = [
    ("not json", b"{model: gpt-mock", "invalid_json", None),
    ("json array", b"[]", "invalid_json", None),
    ("no model", {"messages": HELLO}, "invalid_request", "model"),
    ("model not a string", {"model": 7, "messages": HELLO}, "invalid_request", "model"),
    ("no messages", {"model": "gpt-mock"}, "invalid_request", "messages"),
    ("empty messages", {"model": "gpt-mock", "messages": []}, "invalid_request", "messages"),
    ("message not an object", {"model": "gpt-mock", "messages": ["hi"]}, "invalid_request", "messages[0]"),
    ("bad role", {"model": "gpt-mock", "messages": [{"role": "robot", "content": "x"}]}, "invalid_request",
     "messages[0].role"),
    ("temperature as text", {"model": "gpt-mock", "messages": HELLO, "temperature": "hot"}, "invalid_request",
     "temperature"),
    ("temperature too high", {"model": "gpt-mock", "messages": HELLO, "temperature": 3}, "invalid_request",
     "temperature"),
    ("max_tokens zero", {"model": "gpt-mock", "messages": HELLO, "max_tokens": 0}, "invalid_request",
     "max_tokens"),
    ("stream not bool", {"model": "gpt-mock", "messages": HELLO, "stream": "yes"}, "invalid_request", "stream"),
    ("bad response_format", {"model": "gpt-mock", "messages": HELLO, "response_format": {"type": "xml"}},
     "invalid_request", "response_format"),
    ("unknown parameter", {"model": "gpt-mock", "messages": HELLO, "temprature": 0.1},
     "unsupported_parameter", "temprature"),
]


@pytest.mark.parametrize(("case", "body", "code", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_precise_400(kong: KongHarness, case: str, body: object, code: str,
                                        param: str | None) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    error = _error(_post(kong, raw), 400, code)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_unknown_alias_is_404(kong: KongHarness) -> None:
    error = _error(_post(kong, json.dumps({"model": "gpt-5-ultra", "messages": HELLO})), 404, "model_not_found")
    assert "gpt-5-ultra" in error["message"]


@pytest.mark.parametrize("size", [20_000, MAX_BODY_BYTES + 1, 3 * MAX_BODY_BYTES])
def test_body_over_the_limit_is_413(kong: KongHarness, size: int) -> None:
    """Bodies over Kong's 8 KB client_body_buffer_size are spooled to a file: the access phase must cope."""
    body = json.dumps({"model": "gpt-mock", "messages": [{"role": "user", "content": "x" * size}]})
    response = _post(kong, body)
    if len(body) > MAX_BODY_BYTES:
        _error(response, 413, "request_too_large")
    else:
        assert response.status_code == 200, response.text  # spooled but under the limit: served


def test_unauthenticated_requests_never_reach_the_plugin(kong: KongHarness) -> None:
    events_before = len(kong.traces)
    for headers in ({}, {"apikey": "not-a-key"}):
        response = httpx.post(f"{kong.url}/v1/chat/completions", json={"model": "demo", "messages": HELLO},
                              headers=headers)
        assert response.status_code == 401
    assert len(kong.traces) == events_before  # key-auth answered; our plugin never ran


def test_provider_rate_limit_is_429_with_retry_after(kong: KongHarness) -> None:
    response = _post(kong, json.dumps({"model": "rate-limited", "messages": HELLO}))
    _error(response, 429, "rate_limit_exceeded")
    assert response.headers["Retry-After"] == "7"


@pytest.mark.parametrize(("alias", "status", "code"), [
    ("provider-500", 502, "provider_error"),
    ("provider-503", 502, "provider_error"),
    ("provider-down", 502, "provider_error"),
    ("wrong-key", 502, "provider_auth_error"),
    ("malformed", 502, "provider_error"),
    ("cut-before-first", 502, "provider_error"),
    ("too-slow", 504, "provider_timeout"),
    ("provider-400", 400, "provider_rejected_request"),
])
def test_provider_failures_map_to_gateway_statuses(kong: KongHarness, alias: str, status: int,
                                                   code: str) -> None:
    for stream in (False, True):
        response = _post(kong, json.dumps({"model": alias, "messages": HELLO, "stream": stream}))
        error = _error(response, status, code)
        assert "127.0.0.1" not in error["message"] and "http" not in error["message"]
        assert response.headers["X-Request-ID"]


def test_stream_cut_mid_way_ends_with_an_error_event(client: openai.OpenAI) -> None:
    for alias in ("cut-stream", "claude-cut"):
        received = []
        with pytest.raises(openai.APIError) as raised:
            for chunk in client.chat.completions.create(model=alias, messages=HELLO, stream=True, max_tokens=50):
                received.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(received).strip(), "the chunks before the cut reached the client"
        assert "provider" in str(raised.value).lower()


def test_concurrent_streams_interleave(client: openai.OpenAI) -> None:
    """Several SSE streams through one plugin server at once all complete intact."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        messages = [{"role": "user", "content": f"stream number {i}"}]
        return "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="gpt-mock", messages=messages, stream=True)
                       if c.choices)

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert texts == [f"Hello from mock-gpt: stream number {i}" for i in range(8)]


def test_a_providers_cookie_never_reaches_another_consumer(plugin_server: PluginServerProcess,
                                                          mock_provider: MockProvider) -> None:
    """The provider connections are every consumer's: a cookie one answer sets (a CDN's, say) is neither kept
    for the next request nor passed to the client, on the lean OpenAI path and through LiteLLM's."""
    # by host name: a cookie jar takes no cookies from an IP address
    oa, an = (base.replace("127.0.0.1", "localhost") for base in (mock_provider.openai_base,
                                                                   mock_provider.anthropic_base))
    models = [mock_alias("cookies", "openai/mock-cookie", oa),
              mock_alias("cookies-claude", "anthropic/mock-claude-cookie", an)]
    config = dict(gateway_config(mock_provider), budgets=[], models=models)  # no budgets: earlier tests spend bob's
    calls = [("/v1/chat/completions", "cookies"), ("/v1/chat/completions", "cookies-claude"),
             ("/v1/messages", "cookies-claude")]
    with route_to(plugin_server, config) as route:
        for key in (ALICE_KEY, BOB_KEY, ALICE_KEY):
            for (path, alias), stream in itertools.product(calls, (False, True)):
                answer = httpx.post(f"{route.url}{path}", headers={"apikey": key}, timeout=15,
                                    json={"model": alias, "messages": HELLO, "max_tokens": 20, "stream": stream})
                assert answer.status_code == 200 and "set-cookie" not in answer.headers, answer.text
    sent = mock_provider.requests_for("-cookie")
    assert len(sent) == 18 and not [r for r in sent if "cookie" in r.headers]
