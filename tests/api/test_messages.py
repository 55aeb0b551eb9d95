"""End to end: the Anthropic Python SDK → the Kong-side harness → the real plugin server → LiteLLM → the mock
provider, on ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

An Anthropic deployment gets Anthropic's wire natively; an OpenAI-format one (and the demo provider) gets
LiteLLM's translation. Nothing is mocked but the providers, which are real HTTP servers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from conftest import ALICE_KEY, BOB_KEY, PRICE, gateway_config, route_to, usage_records, wait_for_record
from kong_harness import KongHarness, PluginServerProcess
from llm_gateway.providers.token_count import count_locally
from mock_anthropic_extras import SIGNATURE
from mock_provider import MockProvider

HELLO = [{"role": "user", "content": "Say hello to the gateway"}]
IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
# each alias, and the text its deployment answers HELLO with
ANSWERS = {"claude-mock": "Hello from mock-claude: Say hello to the gateway",
           "gpt-mock": "Hello from mock-gpt: Say hello to the gateway",
           "demo": "Hello from the kong-llm-gateway demo provider. You said: Say hello to the gateway"}


@pytest.fixture
def client(kong: KongHarness) -> anthropic.Anthropic:
    """The Anthropic SDK pointed at "Kong", its x-api-key being the consumer's key-auth key."""
    return anthropic.Anthropic(base_url=kong.url, api_key=ALICE_KEY, max_retries=0)


@pytest.fixture
def bob(kong: KongHarness) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=kong.url, api_key=BOB_KEY, max_retries=0)


def records_of(server: PluginServerProcess, request_id: str) -> list[dict[str, Any]]:
    """Every usage record the server logged for one request (there must be exactly one)."""
    wait_for_record(server, request_id)
    time.sleep(0.2)  # a second record would follow the first within the same settlement
    return [json.loads(line[line.find('{"ts":'):]) for line in server.log_lines()
            if '"event":"usage"' in line and f'"request_id":"{request_id}"' in line]


# -- answers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alias", ["claude-mock", "gpt-mock", "demo"])
def test_json_message(client: anthropic.Anthropic, alias: str, plugin_server: PluginServerProcess) -> None:
    raw = client.messages.with_raw_response.create(model=alias, max_tokens=256, messages=HELLO,
                                                   system="You are terse.")
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.stop_reason == "end_turn"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == ANSWERS[alias]
    assert message.usage.output_tokens > 0 and message.usage.input_tokens > 0
    assert message.usage.cache_read_input_tokens == 0 and message.usage.cache_creation_input_tokens == 0
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.headers["X-LLM-Provider"] == {"claude-mock": "anthropic", "gpt-mock": "openai", "demo": "demo"}[alias]
    record, = records_of(plugin_server, raw.headers["X-Request-ID"])
    assert record["endpoint"] == "messages" and record["alias"] == alias and record["status"] == 200
    assert record["completion_tokens"] == message.usage.output_tokens
    assert raw.headers["X-LLM-Completion-Tokens"] == str(message.usage.output_tokens)


def test_anthropic_deployments_get_the_request_as_sent(client: anthropic.Anthropic,
                                                       mock_provider: MockProvider) -> None:
    mock_provider.clear()
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    # this SDK (2.x) no longer offers the sampling parameters; older clients send them
    client.messages.create(model="claude-mock", max_tokens=300, messages=HELLO, system=system,
                           extra_body={"temperature": 0.5, "top_k": 5}, stop_sequences=["END"],
                           metadata={"user_id": "u-42"}, service_tier="auto")
    sent = mock_provider.requests_for("mock-claude")[-1]
    assert sent.path == "/v1/messages"
    assert sent.body == {"model": "mock-claude", "max_tokens": 300, "messages": HELLO, "system": system,
                         "temperature": 0.5, "top_k": 5, "stop_sequences": ["END"],
                         "metadata": {"user_id": "u-42"}, "service_tier": "auto", "stream": False}


def test_openai_deployments_get_litellms_translation(client: anthropic.Anthropic,
                                                     mock_provider: MockProvider) -> None:
    mock_provider.clear()
    client.messages.create(model="gpt-mock", max_tokens=300, messages=HELLO, system="You are terse.",
                           stop_sequences=["END"], metadata={"user_id": "u-42"})
    sent = mock_provider.requests_for("mock-gpt")[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert sent.body["messages"][1] == {"role": "user", "content": "Say hello to the gateway"}
    assert sent.body["max_tokens"] == 300 and sent.body["stop"] == ["END"] and sent.body["user"] == "u-42"


@pytest.mark.parametrize("alias", ["claude-mock", "gpt-mock", "demo"])
def test_stream_with_the_sdks_helpers(client: anthropic.Anthropic, alias: str,
                                      plugin_server: PluginServerProcess) -> None:
    logged = len(plugin_server.stderr_text())
    with client.messages.stream(model=alias, max_tokens=256, messages=HELLO, system="You are terse.") as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["X-Request-ID"]
        assert stream.response.headers["content-type"].startswith("text/event-stream")
    assert len(pieces) > 1 and "".join(pieces) == ANSWERS[alias]
    assert final.content[0].text == ANSWERS[alias] and final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 1 and final.usage.input_tokens > 0  # from the final message_delta
    record, = records_of(plugin_server, request_id)
    assert record["endpoint"] == "messages" and record["stream"] is True and record["status"] == 200
    assert record["completion_tokens"] == final.usage.output_tokens
    assert record["prompt_tokens"] == final.usage.input_tokens  # no cache on these deployments
    # the mock's models are in no price map: LiteLLM's own costing of them is no error in the gateway's log
    time.sleep(0.5)  # LiteLLM runs its success callbacks after the answer, in a task of its own
    errors = [line for line in plugin_server.stderr_text()[logged:].splitlines()
              if '"level":"ERROR"' in line and '"logger":"LiteLLM' in line]
    assert not errors, errors


@pytest.mark.parametrize("alias", ["claude-mock", "gpt-mock"])
def test_stream_events_on_the_wire(kong: KongHarness, alias: str) -> None:
    body = {"model": alias, "max_tokens": 64, "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{kong.url}/v1/messages", json=body, headers={"x-api-key": ALICE_KEY},
                      timeout=30) as response:
        assert response.status_code == 200
        frames = [f for f in response.read().decode().split("\n\n") if f]
    names = [f.split("\n")[0] for f in frames]
    assert all(n.startswith("event: ") for n in names)
    events = [json.loads(f.split("\n")[1][6:]) for f in frames]
    assert [e["type"] for e in events] == [n[7:] for n in names]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    usage = events[-2]["usage"]
    assert set(usage) >= {"input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"}
    assert not frames[-1].startswith("data: [DONE]")


# -- tools, images, thinking --------------------------------------------------------------------------------

@pytest.mark.parametrize("alias", ["claude-tools", "gpt-tools"])
def test_tool_use_and_tool_result_round_trip(client: anthropic.Anthropic, alias: str,
                                             mock_provider: MockProvider) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.messages.create(model=alias, max_tokens=256, messages=question, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"})
    assert first.stop_reason == "tool_use"
    call, = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "mock"}
    mock_provider.clear()
    second = client.messages.create(model=alias, max_tokens=256, tools=[WEATHER], messages=[
        *question, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 24 C"}]}],
        tool_choice={"type": "none"})
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"
    sent = mock_provider.requests[-1].body
    if alias == "claude-tools":  # Anthropic's blocks go up as they are
        assert sent["messages"][2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id,
                                                     "content": "sunny, 24 C"}
    else:  # LiteLLM's translation: an assistant tool call, then a tool message
        assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
        assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}


@pytest.mark.parametrize("alias", ["claude-tools", "gpt-tools"])
def test_tool_use_streams_as_input_json_deltas(client: anthropic.Anthropic, alias: str) -> None:
    with client.messages.stream(model=alias, max_tokens=256, messages=[{"role": "user", "content": "Paris?"}],
                                tools=[WEATHER]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds  # the SDK's event for an input_json_delta
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "mock"}


@pytest.mark.parametrize("alias", ["claude-mock", "gpt-mock"])
def test_an_image_block(client: anthropic.Anthropic, alias: str, mock_provider: MockProvider) -> None:
    mock_provider.clear()
    content = [{"type": "text", "text": "Describe this image"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMAGE}}]
    message = client.messages.create(model=alias, max_tokens=64, messages=[{"role": "user", "content": content}])
    assert message.content[0].text.endswith("Describe this image")
    sent = mock_provider.requests[-1].body["messages"][0]["content"]
    if alias == "claude-mock":
        assert sent == content
    else:
        assert sent[1] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}"}}


def test_thinking(client: anthropic.Anthropic, mock_provider: MockProvider) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    message = client.messages.create(model="claude-think", max_tokens=2048, messages=HELLO, thinking=thinking)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].signature == SIGNATURE and message.content[0].thinking.startswith("Thinking about")
    assert mock_provider.requests_for("mock-claude-think")[-1].body["thinking"] == thinking
    with client.messages.stream(model="claude-think", max_tokens=2048, messages=HELLO, thinking=thinking) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "thinking" in kinds and "signature" in kinds
    assert final.content[0].thinking == message.content[0].thinking and final.content[0].signature == SIGNATURE
    # the thinking goes back up with the next turn, as Anthropic requires with tools
    follow = client.messages.create(model="claude-think", max_tokens=2048, thinking=thinking, messages=[
        *HELLO, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
        {"role": "user", "content": "And again"}])
    assert follow.content[1].text.endswith("And again")


# -- usage and cost -----------------------------------------------------------------------------------------



@pytest.mark.parametrize("streamed", [False, True])
def test_cache_reads_and_writes_are_accounted(client: anthropic.Anthropic, plugin_server: PluginServerProcess,
                                              streamed: bool) -> None:
    words = [{"role": "user", "content": "one two three four five six seven eight"}]  # 8 prompt tokens
    if streamed:
        with client.messages.stream(model="claude-cache", max_tokens=64, messages=words) as stream:
            list(stream.text_stream)
            usage, request_id = stream.get_final_message().usage, stream.response.headers["X-Request-ID"]
    else:
        raw = client.messages.with_raw_response.create(model="claude-cache", max_tokens=64, messages=words)
        usage, request_id = raw.parse().usage, raw.headers["X-Request-ID"]
    # the deployment reads 2 prompt tokens from cache and writes 3 to it
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (3, 2, 3)
    record, = records_of(plugin_server, request_id)
    assert record["endpoint"] == "messages" and record["prompt_tokens"] == 8
    assert record["cached_tokens"] == 2 and record["cache_creation_tokens"] == 3 and record["cache_status"] == "hit"
    # the alias's price override has its own cache-write price (1.25e-6, tests/conftest.py)
    expected = (3 * PRICE["input_cost_per_token"] + 2 * PRICE["cache_read_input_token_cost"]
                + 3 * 1.25e-6 + usage.output_tokens * PRICE["output_cost_per_token"])
    assert record["cost_usd"] == pytest.approx(expected)


def test_openai_cached_tokens_come_out_as_cache_reads(client: anthropic.Anthropic,
                                                      plugin_server: PluginServerProcess) -> None:
    words = [{"role": "user", "content": "one two three four five six"}]
    raw = client.messages.with_raw_response.create(model="priced-gpt", max_tokens=64, messages=words)
    usage = raw.parse().usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (3, 3, 0)
    record, = records_of(plugin_server, raw.headers["X-Request-ID"])
    assert record["prompt_tokens"] == 6 and record["cached_tokens"] == 3 and record["reasoning_tokens"] == 2
    assert record["cost_usd"] == pytest.approx(3e-6 + 3 * 2.5e-7 + usage.output_tokens * 4e-6)
    with client.messages.stream(model="priced-gpt", max_tokens=64, messages=words) as stream:
        final = stream.get_final_message()
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (3, 3)


# -- errors, in Anthropic's shape ---------------------------------------------------------------------------

def test_bad_input_is_a_400_in_anthropics_shape(kong: KongHarness, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="claude-mock", max_tokens=0, messages=HELLO)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in caught.value.body["error"]["message"]
    response = httpx.post(f"{kong.url}/v1/messages", headers={"x-api-key": ALICE_KEY},
                          json={"model": "claude-mock", "max_tokens": 5, "messages": HELLO, "n": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    assert response.json()["type"] == "error" and "n" in response.json()["error"]["message"]


def test_unknown_model_is_a_404_not_found_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=5, messages=HELLO)
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_a_provider_500_is_retried_on_the_next_deployment(client: anthropic.Anthropic,
                                                          mock_provider: MockProvider) -> None:
    mock_provider.clear()
    raw = client.messages.with_raw_response.create(model="claude-retried", max_tokens=64, messages=HELLO)
    assert raw.parse().content[0].text == "Hello from mock-gpt-second: Say hello to the gateway"
    assert raw.headers["X-LLM-Attempts"] == "2" and raw.headers["X-LLM-Provider"] == "openai"
    assert len(mock_provider.requests_for("mock-claude-err-500")) == 1


def test_an_overloaded_provider_falls_back(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model="claude-falls-back", max_tokens=64, messages=HELLO)
    assert raw.parse().content[0].text == ANSWERS["claude-mock"]
    assert raw.headers["X-LLM-Fallback"] == "claude-mock"


@pytest.mark.parametrize(("alias", "status", "kind"), [
    ("provider-500", 502, "api_error"),
    ("provider-503", 529, "overloaded_error"),
    ("rate-limited", 429, "rate_limit_error"),
])
def test_provider_failures_in_anthropics_shape(client: anthropic.Anthropic, alias: str, status: int,
                                               kind: str) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model=alias, max_tokens=16, messages=HELLO)
    assert caught.value.status_code == status
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == kind
    assert caught.value.response.headers["x-should-retry"] == "false"  # the gateway retried already


@pytest.mark.parametrize(("alias", "kind"), [("claude-cut", "api_error"), ("cut-stream", "api_error"),
                                             ("claude-errmid", "overloaded_error")])
def test_a_stream_failing_midway_ends_with_an_error_event(kong: KongHarness, client: anthropic.Anthropic,
                                                          alias: str, kind: str,
                                                          plugin_server: PluginServerProcess) -> None:
    body = {"model": alias, "max_tokens": 64, "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{kong.url}/v1/messages", json=body, headers={"x-api-key": ALICE_KEY},
                      timeout=30) as response:
        assert response.status_code == 200
        frames = [f for f in response.read().decode().split("\n\n") if f]
        request_id = response.headers["X-Request-ID"]
    assert frames[0].startswith("event: message_start")
    name, data = frames[-1].split("\n")
    assert name == "event: error"
    error = json.loads(data[6:])
    assert error["type"] == "error" and error["error"]["type"] == kind
    assert "Overloaded" not in frames[-1]  # the gateway's words, not the provider's
    record, = records_of(plugin_server, request_id)
    assert record["truncated"] is True and record["endpoint"] == "messages"
    with pytest.raises(anthropic.APIStatusError), \
            client.messages.stream(model=alias, max_tokens=64, messages=HELLO) as stream:
        list(stream.text_stream)


# -- count_tokens ---------------------------------------------------------------------------------------------

def test_count_tokens_asks_anthropic(client: anthropic.Anthropic, mock_provider: MockProvider,
                                     plugin_server: PluginServerProcess) -> None:
    mock_provider.clear()
    counted = client.messages.count_tokens(model="claude-mock", messages=HELLO, system="Be terse now",
                                           tools=[WEATHER])
    assert counted.input_tokens == 5 + 3 + 1  # the mock's count: words, plus one per tool
    sent = mock_provider.requests[-1]
    assert sent.path == "/v1/messages/count_tokens" and sent.body["tools"] == [WEATHER]
    raw = client.messages.with_raw_response.count_tokens(model="claude-mock", messages=HELLO)
    time.sleep(0.3)
    assert raw.headers["X-Request-ID"] not in usage_records(plugin_server)  # nothing charged


def test_count_tokens_counts_with_litellm_elsewhere(client: anthropic.Anthropic,
                                                    mock_provider: MockProvider) -> None:
    mock_provider.clear()
    counted = client.messages.count_tokens(model="gpt-4o-mini", messages=HELLO, system="Be terse now",
                                           tools=[WEATHER])
    expected = count_locally("gpt-4o-mini", {"messages": HELLO, "system": "Be terse now", "tools": [WEATHER]})
    assert counted.input_tokens == expected > 5 + 3
    assert not mock_provider.requests  # no provider was asked


def test_count_tokens_falls_back_when_the_provider_cannot_count(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="provider-500", messages=HELLO)
    assert counted.input_tokens == count_locally("mock-err-500", {"messages": HELLO})


def test_count_tokens_errors(client: anthropic.Anthropic, kong: KongHarness) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.count_tokens(model="no-such-model", messages=HELLO)
    assert caught.value.body["error"]["type"] == "not_found_error"
    response = httpx.post(f"{kong.url}/v1/messages/count_tokens", headers={"x-api-key": ALICE_KEY},
                          json={"model": "claude-mock", "max_tokens": 5, "messages": HELLO})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    assert response.json()["error"]["type"] == "invalid_request_error"


def own_route(mock: MockProvider, name: str, **extra: Any) -> dict[str, Any]:
    """The shared route's config with its own budgets and access rules, on a Redis prefix of its own (bob's
    shared hourly budget is other tests' to spend)."""
    config = gateway_config(mock)
    config["redis"] = {**config["redis"], "key_prefix": f"{config['redis']['key_prefix']}{name}:"}
    return {**config, **extra}


@pytest.fixture
def restricted(plugin_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    """Bob may use gpt-mock only, within a budget no request fits (its prompt plus 16 completion tokens)."""
    config = own_route(mock_provider, "restricted", model_access=[{"consumers": ["bob"], "models": ["gpt-mock"]}],
                       budgets=[{"name": "bob-tiny", "window": "hour", "tokens": 10, "consumers": ["bob"]}])
    with route_to(plugin_server, config) as harness:
        yield harness


def test_model_access_is_a_403_permission_error(restricted: KongHarness) -> None:
    bob = anthropic.Anthropic(base_url=restricted.url, api_key=BOB_KEY, max_retries=0)
    for call in (bob.messages.create, bob.messages.count_tokens):
        kwargs: dict[str, Any] = {"max_tokens": 5} if call == bob.messages.create else {}
        with pytest.raises(anthropic.PermissionDeniedError) as caught:
            call(model="claude-mock", messages=HELLO, **kwargs)
        assert caught.value.body["error"]["type"] == "permission_error"
    assert bob.messages.count_tokens(model="gpt-mock", messages=HELLO).input_tokens > 0  # free: no budget


def test_budget_exhaustion_is_anthropics_rate_limit_error(restricted: KongHarness) -> None:
    bob = anthropic.Anthropic(base_url=restricted.url, api_key=BOB_KEY, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as caught:
        bob.messages.create(model="gpt-mock", max_tokens=5, messages=HELLO)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "rate_limit_error"
    assert caught.value.body["error"]["code"] == "budget_exceeded"


@pytest.fixture
def budgeted(plugin_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    config = own_route(mock_provider, "budgeted",
                       budgets=[{"name": "bob-small", "window": "hour", "tokens": 200, "consumers": ["bob"]}])
    with route_to(plugin_server, config) as harness:
        yield harness


@pytest.mark.parametrize("alias", ["claude-mock", "gpt-mock"])
def test_max_tokens_is_capped_by_the_budget(budgeted: KongHarness, mock_provider: MockProvider,
                                            alias: str) -> None:
    bob = anthropic.Anthropic(base_url=budgeted.url, api_key=BOB_KEY, max_retries=0)
    mock_provider.clear()
    raw = bob.messages.with_raw_response.create(model=alias, max_tokens=1000, messages=HELLO)
    granted = int(raw.headers["X-LLM-Max-Tokens-Capped"])
    assert granted < 200 and mock_provider.requests[-1].body["max_tokens"] == granted


def test_paths_no_endpoint_takes_answer_in_their_clients_format(kong: KongHarness) -> None:
    """Under /v1/messages a 404 or 405 is Anthropic's error (its SDK parses it), elsewhere OpenAI's."""
    with httpx.Client(timeout=30) as http:
        batches = http.post(f"{kong.url}/v1/messages/batches", json={}, headers={"x-api-key": ALICE_KEY})
        wrong_method = http.get(f"{kong.url}/v1/messages", headers={"x-api-key": ALICE_KEY})
        elsewhere = http.post(f"{kong.url}/v1/nope", json={}, headers={"x-api-key": ALICE_KEY})
    assert batches.status_code == 404 and batches.json()["error"]["type"] == "not_found_error"
    assert batches.json()["type"] == "error" and "POST /v1/messages" in batches.json()["error"]["message"]
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"
    assert wrong_method.headers["Allow"] == "POST"
    assert elsewhere.status_code == 404 and set(elsewhere.json()) == {"error"}
    assert elsewhere.json()["error"]["code"] == "unknown_url"
    assert {r.headers["x-should-retry"] for r in (batches, wrong_method, elsewhere)} == {"false"}
