"""``POST /v1/responses`` end to end: the OpenAI SDK (``client.responses.create`` / ``.stream`` / ``.parse``) →
the Kong-side harness → the real plugin server → OpenAI's own Responses API (the mock's ``/v1/responses``,
natively) or LiteLLM's chat-completions bridge (the mock's Anthropic ``/v1/messages``, the demo provider).

Nothing is mocked but the providers, which are real HTTP servers on their wire formats. JSON answers and every
stream event are checked against OpenAI's published schema.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import openai
import pydantic
import pytest

from conftest import ALICE_KEY, BOB_BUDGET_TOKENS, BOB_KEY, PRICE, wait_for_record
from kong_harness import KongHarness, PluginServerProcess
from llm_gateway.api.responses import ENDPOINT, as_messages, parse_responses_request
from llm_gateway.errors import GatewayError
from mock_provider import MockProvider
from openai_spec import assert_valid, require_spec

HELLO = "Say hello to the gateway"
WEATHER = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
PIXEL = "data:image/png;base64," + base64.b64encode(
    bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                  "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")).decode()


def _event_schemas() -> dict[str, str]:
    schemas = require_spec()["components"]["schemas"]
    names = [ref["$ref"].rsplit("/", 1)[-1] for ref in schemas["ResponseStreamEvent"]["anyOf"]]
    return {schemas[n]["properties"]["type"]["enum"][0]: n for n in names}


def raw_stream(kong: KongHarness, body: dict[str, Any], key: str = ALICE_KEY) -> tuple[httpx.Headers, list]:
    """(headers, [(event name, data)]) of a stream, read as bytes off the wire."""
    with httpx.stream("POST", f"{kong.url}/v1/responses", headers={"apikey": key}, timeout=30,
                      json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        events.append((lines[0][7:], json.loads(lines[1][6:])))
    return response.headers, events


def assert_valid_stream(events: list[tuple[str, dict]]) -> None:
    """Every event valid per the spec, named by its type, numbered 0, 1, 2, ... (no [DONE] in a Responses
    stream)."""
    schemas = _event_schemas()
    for i, (name, data) in enumerate(events):
        assert name == data["type"]
        assert data["sequence_number"] == i, [d["sequence_number"] for _, d in events]
        assert_valid(schemas[data["type"]], data)


# -- parsing (no server) ------------------------------------------------------------------------------------

def _parse(**body: Any) -> Any:
    return parse_responses_request(json.dumps({"model": "m", **body}).encode())


def _refused(**body: Any) -> GatewayError:
    with pytest.raises(GatewayError) as raised:
        _parse(**body)
    assert raised.value.status == 400
    return raised.value


def test_parse_keeps_what_was_set_and_limits_max_output_tokens() -> None:
    request = _parse(input="hi", instructions="be brief", max_output_tokens=64, temperature=None, store=False,
                     previous_response_id=None, background=False, text={"format": {"type": "text"}})
    assert request.endpoint == "responses" and request.limit_keys == ("max_output_tokens",)
    assert request.params == {"input": "hi", "instructions": "be brief", "max_output_tokens": 64,
                              "text": {"format": {"type": "text"}}}
    assert request.stream is False and request.builtin == ()
    assert request.prompt_tokens("gpt-4o-mini") > 4  # instructions and input


@pytest.mark.parametrize(("field", "value"), [("previous_response_id", "resp_123"), ("store", True),
                                              ("conversation", "conv_1"), ("background", True),
                                              ("prompt", {"id": "pmpt_1"})])
def test_stateful_fields_are_refused_by_name(field: str, value: Any) -> None:
    err = _refused(input="hi", **{field: value})
    assert err.param == field and "stateless" in err.message and err.code == "unsupported_parameter"


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0].image_url"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input[0].output"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": "hi", "max_output_tokens": 5}, "max_output_tokens"),
    ({"input": "hi", "temperature": 3}, "temperature"),
    ({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "hi", "tools": [{"type": "teleport"}]}, "tools[0].type"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"input": "hi", "reasoning": {"effort": "maximal"}}, "reasoning"),
    ({"input": "hi", "frobnicate": 1}, "frobnicate"),
    ({"input": "hi", "moderation": {"model": "m"}}, "moderation"),
    ({"input": "hi", "stream": "yes"}, "stream"),
])
def test_bad_input_names_the_field(body: dict[str, Any], param: str) -> None:
    assert _refused(**body).param == param


def test_builtin_tools_and_items_are_noted_for_the_deployment_to_judge() -> None:
    request = _parse(input=[{"type": "web_search_call", "id": "ws_1", "status": "completed"}],
                     tools=[*WEATHER, {"type": "web_search"}])
    assert [(b.param, b.kind) for b in request.builtin] == [("input[0]", "web_search_call"), ("tools[1]", "web_search")]


def test_token_estimates_read_every_input_item() -> None:
    messages = as_messages({"instructions": "sys", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "one"}, {"type": "input_image",
                                                                          "image_url": PIXEL}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"a\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "two"}]})
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[1]["content"][1]["type"] == "image_url"
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == "{\"a\": 1}"


def test_error_event_continues_the_stream_numbering() -> None:
    from llm_gateway.providers.responses import next_sequence

    err = GatewayError(502, "The provider's stream broke off.", type="server_error", code="provider_error")
    token = next_sequence.set([7])
    try:
        event = ENDPOINT.errors.stream_event(err)
    finally:
        next_sequence.reset(token)
    name, data = event.decode().split("\n")[:2]
    assert name == "event: error"
    payload = json.loads(data[6:])
    assert payload == {"type": "error", "code": "provider_error", "message": "The provider's stream broke off.",
                       "param": None, "sequence_number": 7}
    assert_valid("ResponseErrorEvent", payload)
    assert json.loads(ENDPOINT.errors.body(err))["error"]["code"] == "provider_error"


# -- end to end ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("alias", "path", "provider"), [("gpt-mock", "/v1/responses", "openai"),
                                                         ("claude-mock", "/v1/messages", "anthropic")])
def test_json_text_native_and_bridged(client: openai.OpenAI, mock_provider: MockProvider, alias: str, path: str,
                                      provider: str) -> None:
    mock_provider.clear()
    raw = client.responses.with_raw_response.create(model=alias, input=HELLO, instructions="Be brief.",
                                                    max_output_tokens=50, temperature=0.5)
    response = raw.parse()
    model = alias.replace("gpt-mock", "mock-gpt").replace("claude-mock", "mock-claude")
    assert response.output_text == f"Hello from {model}: {HELLO}"
    assert response.status == "completed" and response.store is False and response.id.startswith("resp_")
    assert response.usage.input_tokens == 7 and response.usage.output_tokens == 8  # the mock's word counts
    assert raw.headers["X-LLM-Provider"] == provider
    assert_valid("Response", json.loads(raw.content))
    upstream = [r for r in mock_provider.requests if r.path == path][-1].body
    if provider == "openai":  # forwarded natively, stateless
        assert upstream["input"] == HELLO and upstream["instructions"] == "Be brief."
        assert upstream["store"] is False and upstream["max_output_tokens"] == 50
    else:  # LiteLLM's bridge: instructions become the system prompt
        assert upstream["system"][0]["text"] == "Be brief." and upstream["max_tokens"] == 50
        assert upstream["messages"][0]["content"][0]["text"] == HELLO
    assert upstream["temperature"] == 0.5


@pytest.mark.parametrize("alias", ["gpt-mock", "claude-mock", "demo"])
def test_stream_helper_and_wire_events(client: openai.OpenAI, kong: KongHarness, alias: str) -> None:
    with client.responses.stream(model=alias, input=HELLO, max_output_tokens=50) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
    assert final.output_text.endswith(HELLO) and final.usage.output_tokens >= 8
    headers, events = raw_stream(kong, {"model": alias, "input": HELLO, "max_output_tokens": 50})
    assert_valid_stream(events)
    deltas = "".join(d["delta"] for name, d in events if name == "response.output_text.delta")
    assert deltas == final.output_text
    assert events[-1][1]["response"]["usage"]["output_tokens"] == final.usage.output_tokens
    assert headers["X-LLM-Provider"] == ("openai" if alias == "gpt-mock" else "anthropic" if alias == "claude-mock"
                                         else "demo")


def test_keyless_demo_answers_the_readme_snippet(client: openai.OpenAI) -> None:
    response = client.responses.create(model="demo", input="hi")
    assert response.output_text == "Hello from the kong-llm-gateway demo provider. You said: hi"
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


@pytest.mark.parametrize("alias", ["gpt-mock", "claude-mock"])
def test_structured_input_items(client: openai.OpenAI, mock_provider: MockProvider, alias: str) -> None:
    mock_provider.clear()
    response = client.responses.create(model=alias, max_output_tokens=50, input=[
        {"role": "developer", "content": "Answer in one line."},
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": PIXEL, "detail": "low"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A pixel."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Say hello to the gateway"}]},
    ])
    assert response.output_text.endswith(HELLO)
    sent = mock_provider.requests[-1].body
    if alias == "gpt-mock":
        assert sent["input"][1]["content"][1]["image_url"] == PIXEL
    else:
        assert sent["system"][0]["text"] == "Answer in one line."
        image = sent["messages"][0]["content"][1]
        assert image["type"] == "image" and image["source"]["media_type"] == "image/png"
        assert sent["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "A pixel."}]}


@pytest.mark.parametrize("alias", ["gpt-tools", "claude-tools"])
def test_function_call_and_output_round_trip(client: openai.OpenAI, mock_provider: MockProvider,
                                             alias: str) -> None:
    first = client.responses.create(model=alias, input="Weather in Paris?", tools=WEATHER, tool_choice="auto",
                                    max_output_tokens=50)
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {
        "city": "mock"}
    with client.responses.stream(model=alias, input="Weather in Paris?", tools=WEATHER,
                                 max_output_tokens=50) as stream:
        streamed = stream.get_final_response().output[-1]
    assert streamed.type == "function_call" and json.loads(streamed.arguments) == {"city": "mock"}
    mock_provider.clear()
    second = client.responses.create(model=alias, tools=WEATHER, max_output_tokens=50, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    sent = mock_provider.requests[-1].body
    if alias == "gpt-tools":  # (the Anthropic mock calls a tool whenever it has tools, so only OpenAI's answers)
        assert second.output[-1].type == "message"
        assert sent["input"][2] == {"type": "function_call_output", "call_id": call.call_id,
                                    "output": "sunny, 21 C"}
    else:  # the bridge: a tool_use block, then its tool_result
        assert sent["messages"][1]["content"][0]["type"] == "tool_use"
        result = sent["messages"][2]["content"][0]
        assert result["type"] == "tool_result" and result["tool_use_id"] == call.call_id
        assert "sunny, 21 C" in json.dumps(result["content"])


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


def test_structured_output(client: openai.OpenAI, mock_provider: MockProvider) -> None:
    parsed = client.responses.parse(model="gpt-mock", input="Weather in Paris?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="mock", celsius=1)
    fmt = mock_provider.requests[-1].body["text"]["format"]
    assert fmt["type"] == "json_schema" and fmt["name"] == "Weather" and fmt["strict"] is True
    client.responses.create(model="claude-mock", input="Weather in Paris?", max_output_tokens=50,
                            text={"format": {"type": "json_schema", "name": "Weather",
                                             "schema": Weather.model_json_schema()}})
    sent = mock_provider.requests[-1].body  # LiteLLM's translation for Anthropic: a forced tool with the schema
    assert sent["tool_choice"] == {"name": "json_tool_call", "type": "tool"}
    assert sent["tools"][0]["input_schema"]["required"] == ["city", "celsius"]


def test_builtin_tools_reach_openai_and_are_refused_elsewhere(client: openai.OpenAI,
                                                             mock_provider: MockProvider) -> None:
    client.responses.create(model="gpt-mock", input=HELLO, tools=[{"type": "web_search"}])
    assert mock_provider.requests[-1].body["tools"] == [{"type": "web_search"}]
    mock_provider.clear()
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="claude-mock", input=HELLO, tools=[*WEATHER, {"type": "web_search"}],
                                max_output_tokens=50)
    assert raised.value.body["param"] == "tools[1]" and "web_search" in raised.value.body["message"]
    assert not mock_provider.requests, "refused before any provider call"


@pytest.mark.parametrize(("extra", "param"), [({"previous_response_id": "resp_abc"}, "previous_response_id"),
                                              ({"store": True}, "store"),
                                              ({"conversation": "conv_abc"}, "conversation"),
                                              ({"background": True}, "background")])
def test_stateful_requests_get_a_400(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="gpt-mock", input=HELLO, **extra)
    assert raised.value.body["param"] == param and raised.value.body["code"] == "unsupported_parameter"
    assert client.responses.create(model="gpt-mock", input=HELLO, store=False).store is False


def test_bad_input_is_a_400_with_param(client: openai.OpenAI, kong: KongHarness) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="gpt-mock", input=[{"role": "user", "content": [{"type": "text"}]}])
    assert raised.value.body["param"] == "input[0].content[0].type"
    response = httpx.post(f"{kong.url}/v1/responses", headers={"apikey": ALICE_KEY}, timeout=30,
                          json={"model": "gpt-mock", "input": HELLO, "frobnicate": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "frobnicate"
    missing = httpx.post(f"{kong.url}/v1/responses", headers={"apikey": ALICE_KEY}, timeout=30,
                         json={"model": "no-such-alias", "input": HELLO})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_provider_500_is_retried_then_a_502(client: openai.OpenAI, mock_provider: MockProvider) -> None:
    mock_provider.clear()
    with pytest.raises(openai.APIStatusError) as raised:
        client.responses.with_raw_response.create(model="provider-500", input=HELLO)
    assert raised.value.status_code == 502 and raised.value.body["code"] == "provider_error"
    attempts = int(raised.value.response.headers["X-LLM-Attempts"])
    assert attempts > 1 and len(mock_provider.requests_for("mock-err-500")) == attempts


def test_budget_caps_max_output_tokens_then_429(kong: KongHarness, mock_provider: MockProvider) -> None:
    capped = False
    for _ in range(60):
        mock_provider.clear()
        response = httpx.post(f"{kong.url}/v1/responses", headers={"apikey": BOB_KEY}, timeout=30,
                              json={"model": "gpt-mock", "input": HELLO, "max_output_tokens": 100_000})
        if response.status_code == 429:
            break
        assert response.status_code == 200, response.text
        granted = int(response.headers["X-LLM-Max-Tokens-Capped"])  # the reservation bounds the completion
        assert mock_provider.requests[-1].body["max_output_tokens"] == granted < BOB_BUDGET_TOKENS
        capped = True
    else:
        pytest.fail("the budget never ran out")
    error = response.json()["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "rate_limit_error"
    assert capped or int(response.headers["Retry-After"]) >= 1


def _cost(usage: dict[str, Any]) -> float:
    cached = usage["input_tokens_details"]["cached_tokens"]
    return ((usage["input_tokens"] - cached) * PRICE["input_cost_per_token"]
            + cached * PRICE["cache_read_input_token_cost"] + usage["output_tokens"] * PRICE["output_cost_per_token"])


@pytest.mark.parametrize("alias", ["priced-gpt", "priced-claude"])
def test_usage_is_recorded_once_with_tokens_and_cost(client: openai.OpenAI, kong: KongHarness,
                                                     plugin_server: PluginServerProcess, alias: str) -> None:
    raw = client.responses.with_raw_response.create(model=alias, input=HELLO, max_output_tokens=50)
    usage = json.loads(raw.content)["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] == (3 if alias == "priced-gpt" else 4)
    record = wait_for_record(plugin_server, raw.headers["X-Request-ID"])
    assert record["endpoint"] == "responses" and record["status"] == 200 and record["estimated"] is False
    assert record["prompt_tokens"] == usage["input_tokens"] and record["completion_tokens"] == usage["output_tokens"]
    assert record["cached_tokens"] == usage["input_tokens_details"]["cached_tokens"]
    assert record["reasoning_tokens"] == usage["output_tokens_details"]["reasoning_tokens"]
    assert record["cost_usd"] == pytest.approx(_cost(usage), rel=1e-9)
    assert float(raw.headers["X-LLM-Cost-USD"]) == pytest.approx(_cost(usage), abs=1e-8)
    # a stream: the completed event's usage carries the cost, and the record says the same
    headers, events = raw_stream(kong, {"model": alias, "input": HELLO, "max_output_tokens": 50})
    streamed = events[-1][1]["response"]["usage"]
    assert streamed["cost_usd"] == pytest.approx(_cost(streamed), rel=1e-6)
    record = wait_for_record(plugin_server, headers["X-Request-ID"])
    assert record["stream"] is True and record["truncated"] is False
    assert record["completion_tokens"] == streamed["output_tokens"]
    lines = [line for line in plugin_server.stderr_text().splitlines()
             if '"event":"usage"' in line and raw.headers["X-Request-ID"] in line]
    assert len(lines) == 1, "recorded exactly once"


@pytest.mark.parametrize("alias", ["cut-stream", "claude-cut"])
def test_stream_cut_midway_ends_with_an_error_event_and_is_recorded(
        client: openai.OpenAI, kong: KongHarness, plugin_server: PluginServerProcess, alias: str) -> None:
    headers, events = raw_stream(kong, {"model": alias, "input": HELLO, "max_output_tokens": 50})
    assert_valid_stream(events)
    name, error = events[-1]
    assert name == "error" and error["code"] == "provider_error" and error["sequence_number"] == len(events) - 1
    assert sum(n == "response.output_text.delta" for n, _ in events) == 3
    record = wait_for_record(plugin_server, headers["X-Request-ID"])
    assert record["status"] == 502 and record["truncated"] is True
    assert record["estimated"] is True and record["completion_tokens"] >= 3  # from the text that passed
    with client.responses.stream(model=alias, input=HELLO, max_output_tokens=50) as stream:
        kinds = [event.type for event in stream]
        assert kinds[-1] == "error"
        with pytest.raises(RuntimeError):
            stream.get_final_response()
