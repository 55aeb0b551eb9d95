"""Every answer the gateway gives, on every provider path, validates against OpenAI's published schemas.

JSON answers against ``CreateChatCompletionResponse``, every stream chunk against
``CreateChatCompletionStreamResponse``, every error body (and mid-stream error event) against
``ErrorResponse``: for the lean OpenAI-format path (a catalog model and one LiteLLM does not know), the
``litellm.acompletion`` path (Anthropic) and the built-in demo provider. Strictly typed clients (Go, Java,
TypeScript with validation) rely on the nullable fields being present, which the Python SDK would forgive.
The schemas come from ``../shared/specs/openai-openapi.yaml`` (skipped with a reason when absent).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import ALICE_KEY, MAX_BODY_BYTES, mock_alias, route_to, wait_for_record
from kong_harness import KongHarness, PluginServerProcess
from mock_provider import MockProvider
from openai_spec import assert_valid, require_spec

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def conformance_config(mock: MockProvider) -> dict[str, Any]:
    oa, an = mock.openai_base, mock.anthropic_base

    return {
        "max_body_bytes": MAX_BODY_BYTES,
        "routing": {"backoff_initial": 0.01, "backoff_max": 0.2, "retries": 1},
        "models": [
            mock_alias("gpt", "openai/mock-gpt-cf", oa),
            mock_alias("gpt-4o-mini", "openai/gpt-4o-mini", oa),
            mock_alias("o3-mini", "openai/o3-mini", oa),
            mock_alias("gpt-tools", "openai/mock-gpt-tool-cf", oa),
            mock_alias("claude", "anthropic/mock-claude-cf", an),
            mock_alias("claude-tools", "anthropic/mock-claude-tool-cf", an),
            {"name": "demo", "deployments": [{"model": "demo/echo"}]},
            mock_alias("gpt-429", "openai/mock-cf-err-429-ra-1", oa),
            mock_alias("claude-429", "anthropic/mock-cf-claude-err-429-ra-1", an),
            mock_alias("gpt-500", "openai/mock-cf-err-500", oa),
            mock_alias("claude-529", "anthropic/mock-cf-claude-err-529", an),
            mock_alias("gpt-400", "openai/mock-cf-err-400", oa),
            mock_alias("claude-400", "anthropic/mock-cf-claude-err-400", an),
            mock_alias("gpt-slow", "openai/mock-cf-slow-2000", oa, timeout=0.3),
            mock_alias("gpt-cut", "openai/mock-cf-cut-2", oa),
            mock_alias("claude-cut", "anthropic/mock-cf-claude-cut-2", an),
        ],
    }


@pytest.fixture(scope="module")
def route(plugin_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    require_spec()
    with route_to(plugin_server, conformance_config(mock_provider)) as harness:
        yield harness


def post(route: KongHarness, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{route.url}/v1/chat/completions", content=content, timeout=30,
                      headers={"apikey": ALICE_KEY, "Content-Type": "application/json"})


def hello(marker: str = "") -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Say hello {marker or uuid.uuid4().hex[:8]}"}]


def sse_payloads(response: httpx.Response) -> list[Any]:
    """The JSON of every data event, the final [DONE] excluded (and required)."""
    data = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", "a stream ends with [DONE]"
    return [json.loads(d) for d in data[:-1]]


JSON_CASES = [
    ("gpt", {}), ("gpt-4o-mini", {}), ("claude", {"max_tokens": 50}), ("demo", {}),
    ("gpt-tools", {"tools": TOOLS}), ("claude-tools", {"tools": TOOLS, "max_tokens": 50}),
    ("claude", {"max_tokens": 50, "response_format": {"type": "json_object"}}),
    ("claude", {"max_tokens": 50, "temperature": 0.3, "stop": ["END"], "user": "u-1"}),
]


@pytest.mark.parametrize(("alias", "extra"), JSON_CASES, ids=[f"{a}-{'-'.join(e) or 'plain'}" for a, e in JSON_CASES])
def test_json_answers_match_the_schema(route: KongHarness, alias: str, extra: dict[str, Any]) -> None:
    response = post(route, {"model": alias, "messages": hello(), **extra})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_valid("CreateChatCompletionResponse", answer)
    message = answer["choices"][0]["message"]
    if "tools" in extra:  # a tool-call answer: content is there, and null
        assert message["tool_calls"] and "content" in message and message["content"] is None
    for choice in answer["choices"]:  # the nullable fields required: present, not merely tolerated
        assert "logprobs" in choice and "refusal" in choice["message"]


STREAM_CASES = [(alias, usage, extra) for alias, extra in
                [("gpt", {}), ("gpt-4o-mini", {}), ("claude", {"max_tokens": 50}), ("demo", {}),
                 ("gpt-tools", {"tools": TOOLS}), ("claude-tools", {"tools": TOOLS, "max_tokens": 50})]
                for usage in (False, True)]


@pytest.mark.parametrize(("alias", "include_usage", "extra"), STREAM_CASES,
                         ids=[f"{a}-{'usage' if u else 'no-usage'}-{'tools' if e.get('tools') else 'text'}"
                              for a, u, e in STREAM_CASES])
def test_every_stream_chunk_matches_the_schema(route: KongHarness, alias: str, include_usage: bool,
                                               extra: dict[str, Any]) -> None:
    body = {"model": alias, "messages": hello(), "stream": True, **extra}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    response = post(route, body)
    assert response.status_code == 200, response.text
    chunks = sse_payloads(response)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
        for choice in chunk["choices"]:
            assert "finish_reason" in choice, "finish_reason is required (null) in every chunk"
    finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"]]
    assert finishes[-1] in ("stop", "tool_calls") and all(f is None for f in finishes[:-1])
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1]["choices"] == []
    else:
        assert not usage_chunks


def _error_body(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert_valid("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _with(**extra: Any) -> dict[str, Any]:
    return {"messages": hello(), **extra}


ERROR_CASES = [
    # (name, alias, body extras, status, code, param)
    ("invalid json", "gpt", None, 400, "invalid_json", None),
    ("unknown alias", "nope", _with(), 404, "model_not_found", "model"),
    ("bad temperature", "gpt", _with(temperature=9), 400, "invalid_request", "temperature"),
    ("unknown field", "claude", _with(temprature=1), 400, "unsupported_parameter", "temprature"),
    ("bad part", "claude", {"messages": [{"role": "user", "content": [{"type": "weird"}]}]}, 400,
     "invalid_request", "messages[0].content[0].type"),
    ("catalog model lacks it", "gpt-4o-mini", _with(reasoning_effort="low"), 400, "unsupported_parameter",
     "reasoning_effort"),
    ("o-series temperature", "o3-mini", _with(temperature=0.2), 400, "unsupported_parameter", "temperature"),
    ("anthropic n", "claude", _with(n=2), 400, "unsupported_parameter", "n"),
    ("anthropic audio part", "claude", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]}, 400,
     "unsupported_content", "messages[0].content[0]"),
    ("demo bad role", "demo", {"messages": [{"role": {}, "content": "x"}]}, 400, "invalid_request",
     "messages[0].role"),
    ("openai 429", "gpt-429", _with(), 429, "rate_limit_exceeded", None),
    ("anthropic 429", "claude-429", _with(), 429, "rate_limit_exceeded", None),
    ("openai 500", "gpt-500", _with(), 502, "provider_error", None),
    ("anthropic 529", "claude-529", _with(), 502, "provider_error", None),
    ("openai 400", "gpt-400", _with(), 400, "provider_rejected_request", None),
    ("anthropic 400", "claude-400", _with(), 400, "provider_rejected_request", None),
    ("timeout", "gpt-slow", _with(), 504, "provider_timeout", None),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("name", "alias", "body", "status", "code", "param"), ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
def test_every_error_body_matches_the_schema(route: KongHarness, name: str, alias: str,
                                             body: dict[str, Any] | None, status: int, code: str,
                                             param: str | None, stream: bool) -> None:
    raw = b"{not json" if body is None else {"model": alias, **body, "stream": stream}
    response = post(route, raw)
    assert response.status_code == status, response.text
    error = _error_body(response)
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("alias", ["gpt-cut", "claude-cut"])
def test_mid_stream_error_events_match_the_schema(route: KongHarness, alias: str) -> None:
    response = post(route, {"model": alias, "messages": hello(), "stream": True, "max_tokens": 50})
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    *chunks, last = events
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    assert_valid("ErrorResponse", last)
    assert last["error"]["code"] == "provider_error"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_clients_own_request_id_is_echoed_and_recorded(route: KongHarness, plugin_server: PluginServerProcess,
                                                        stream: bool) -> None:
    """Kong's id stays X-Request-ID; the client's used to be replaced without trace."""
    mine = f"my-trace-{uuid.uuid4().hex[:12]}"
    response = httpx.post(f"{route.url}/v1/chat/completions", timeout=30,
                          headers={"apikey": ALICE_KEY, "X-Request-ID": mine},
                          json={"model": "gpt", "messages": hello(), "stream": stream})
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == response.headers["X-Kong-Request-Id"] != mine
    assert response.headers["X-Client-Request-ID"] == mine
    record = wait_for_record(plugin_server, response.headers["X-Request-ID"])
    assert record["client_request_id"] == mine
    error = httpx.post(f"{route.url}/v1/chat/completions", timeout=30,
                       headers={"apikey": ALICE_KEY, "X-Request-ID": mine}, json={"model": "gpt"})
    assert error.status_code == 400 and error.headers["X-Client-Request-ID"] == mine


PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
       "AAAABJRU5ErkJggg==")
HISTORY = [
    {"role": "developer", "content": "Use tools."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"},
                                                {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "It is sunny."}]},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.mark.parametrize("alias", ["gpt", "gpt-4o-mini", "claude", "demo"])
def test_what_real_clients_send_is_served(route: KongHarness, alias: str) -> None:
    """Tool histories, images, developer messages, text parts, structured outputs: all accepted."""
    import openai
    import openai.lib._pydantic
    from pydantic import BaseModel

    client = openai.OpenAI(base_url=f"{route.url}/v1", api_key="unused", max_retries=0,
                           default_headers={"apikey": ALICE_KEY})
    completion = client.chat.completions.create(model=alias, messages=HISTORY, tools=TOOLS, max_tokens=50,
                                                tool_choice="none", stop=[])
    assert_valid("CreateChatCompletionResponse", completion.model_dump(mode="json", exclude_unset=True))

    class City(BaseModel):
        name: str

    schema = openai.lib._pydantic.to_strict_json_schema(City)  # what parse() sends
    client.chat.completions.create(model=alias, messages=hello(), max_tokens=50, response_format={
        "type": "json_schema", "json_schema": {"name": "City", "schema": schema, "strict": True}})
    if alias.startswith("gpt"):  # OpenAI-format only: n, logprobs
        client.chat.completions.create(model=alias, messages=hello(), n=2, logprobs=True, top_logprobs=2)
