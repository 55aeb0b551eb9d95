"""Validation of Anthropic Messages requests (api/messages.py): what is admitted, and the precise 400 for what
is not, naming the field, in Anthropic's error shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llm_gateway.api.base import ANTHROPIC_ERRORS
from llm_gateway.api.messages import ENDPOINT, parse_messages_request, parse_prompt
from llm_gateway.errors import GatewayError

IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
TOOL = {"name": "get_weather", "description": "The weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        "cache_control": {"type": "ephemeral"}}


def body(**fields: Any) -> bytes:
    request = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps({k: v for k, v in request.items() if v is not ...}).encode()


def refused(raw: bytes) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        ENDPOINT.parse(raw)
    assert caught.value.status == 400
    return caught.value


def test_a_full_request_is_admitted_as_sent() -> None:
    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this image, and the weather?", "cache_control": {"type": "ephemeral"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "A memo."},
             "title": "memo"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "The user wants the weather.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": False,
                                      "content": [{"type": "text", "text": "sunny"}]}]},
    ]
    request = parse_messages_request(body(
        messages=messages, system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral",
                                                                                           "ttl": "1h"}}],
        tools=[TOOL], tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=2048, temperature=1, top_p=0.9, top_k=5,
        stop_sequences=["END"], stream=True, metadata={"user_id": "u-1"}, service_tier="auto"))
    assert request.model == "claude" and request.stream is True
    assert request.endpoint == "messages" and request.limit_keys == ("max_tokens",)
    assert request.params["messages"] == messages
    assert "stream" not in request.params and "model" not in request.params
    assert request.params["max_tokens"] == 2048 and request.params["tools"] == [TOOL]
    assert request.params["service_tier"] == "auto" and request.params["metadata"] == {"user_id": "u-1"}


def test_nulls_mean_absent() -> None:
    request = parse_messages_request(body(system=None, temperature=None, stream=None, tools=None))
    assert set(request.params) == {"messages", "max_tokens"} and request.stream is False


@pytest.mark.parametrize(("fields", "param"), [
    ({"model": ...}, "model"),
    ({"model": ""}, "model"),
    ({"max_tokens": ...}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64",
                                                                               "media_type": "image/bmp",
                                                                               "data": "x"}}]}]},
     "messages[0].content[0].source.media_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "ftp://x"}}]}]},
     "messages[0].content[0].source.url"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x",
                                                  "cache_control": {"type": "permanent"}}]}]},
     "messages[0].content[0].cache_control"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                  "content": [{"type": "tool_use"}]}]}]},
     "messages[0].content[0].content[0].type"),
    ({"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "x"}]}]},
     "messages[0].content[0].signature"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "x",
                                                       "input": "{}"}]}]},
     "messages[0].content[0].input"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "base64",
                                                                                  "media_type": "text/html",
                                                                                  "data": "x"}}]}]},
     "messages[0].content[0].source"),
    ({"system": 5}, "system"),
    ({"system": [{"type": "image"}]}, "system"),
    ({"tools": {"name": "x"}}, "tools"),
    ({"tools": [{"name": "x"}]}, "tools"),
    ({"tools": [{"name": "has space", "input_schema": {"type": "object"}}]}, "tools"),
    ({"tool_choice": {"type": "required"}, "tools": [TOOL]}, "tool_choice"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tool_choice": {"type": "tool", "name": "other"}, "tools": [TOOL]}, "tool_choice.name"),
    ({"thinking": {"type": "enabled"}}, "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}, "max_tokens": 4096}, "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 2048}, "thinking.budget_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"stream": "yes"}, "stream"),
    ({"metadata": {"user_id": "u", "team": "t"}}, "metadata"),
    ({"service_tier": "priority"}, "service_tier"),
])
def test_bad_input_is_refused_naming_the_field(fields: dict[str, Any], param: str) -> None:
    err = refused(body(**fields))
    assert err.param == param, err.message
    assert param.split(".")[0].split("[")[0] in err.message


def test_unknown_fields_are_refused_by_name() -> None:
    err = refused(body(max_tokens_to_sample=5, frequency_penalty=0.5))
    assert err.param == "frequency_penalty" and err.code == "unsupported_parameter"
    assert "frequency_penalty, max_tokens_to_sample" in err.message


@pytest.mark.parametrize("raw", [b"", b"[]", b"{", b'{"model": NaN}', b"\xff"])
def test_unreadable_bodies_get_a_400(raw: bytes) -> None:
    err = refused(raw)
    assert err.code == "invalid_json"


def test_errors_are_written_in_anthropics_shape() -> None:
    err = refused(body(max_tokens=0))
    shaped = json.loads(ANTHROPIC_ERRORS.body(err))
    assert shaped["type"] == "error"
    assert shaped["error"]["type"] == "invalid_request_error" and "max_tokens" in shaped["error"]["message"]
    event = ANTHROPIC_ERRORS.stream_event(err)
    assert event.startswith(b"event: error\ndata: {")


def test_count_tokens_bodies_take_the_prompt_only() -> None:
    model, stream, params = parse_prompt(body(max_tokens=..., tools=[TOOL], system="Be brief."), count_only=True)
    assert model == "claude" and stream is False and set(params) == {"messages", "tools", "system"}
    with pytest.raises(GatewayError) as caught:
        parse_prompt(body(), count_only=True)  # max_tokens belongs to /v1/messages
    assert caught.value.param == "max_tokens"


def test_prompt_tokens_count_system_messages_and_tool_traffic() -> None:
    short = parse_messages_request(body())
    long = parse_messages_request(body(system="You are a meticulous assistant. " * 20, messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather",
                                           "input": {"city": "Paris, the capital of France"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "Sunny, 24 degrees, light wind from the west"}]}]))
    assert 0 < short.prompt_tokens("gpt-4o-mini") < 15
    assert long.prompt_tokens("gpt-4o-mini") > short.prompt_tokens("gpt-4o-mini") + 100
    assert long.prompt_tokens("claude-sonnet-4-5") > 100  # Claude's models count with tiktoken, no download
