"""providers.messages against the real mock provider (nothing mocked: LiteLLM calls real local HTTP servers):
Anthropic's wire natively to an Anthropic deployment, LiteLLM's translation to an OpenAI-format one, usage as
the ledger reads it, provider failures as Anthropic's clients expect them, and count_tokens both ways."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import PROVIDER_KEY
from llm_gateway.accounting.prices import Prices, cost_usd
from llm_gateway.accounting.tokens import from_provider_usage
from llm_gateway.config import Deployment
from llm_gateway.errors import GatewayError
from llm_gateway.providers import messages, token_count
from llm_gateway.providers.openai_compatible import Usage
from mock_anthropic_extras import EXTRAS, SIGNATURE
from mock_provider import MockProvider

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the lean path's connection pool lives on one loop
HELLO = [{"role": "user", "content": "hello there you"}]
PRICES = Prices(input_per_token=1e-6, output_per_token=4e-6, cache_read_per_token=2.5e-7,
                cache_creation_per_token=1.25e-6)


def deployment(mock: MockProvider, model: str) -> Deployment:
    base = {"anthropic": mock.anthropic_base, "extras": mock.base_url + EXTRAS}.get(model.split("/")[0],
                                                                                 mock.openai_base)
    return Deployment(model=model.replace("extras/", "anthropic/"), api_base=base, api_key=PROVIDER_KEY, timeout=5)


def events(raw: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for event in raw:
        name, data = event.decode().rstrip("\n").split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: ") and event.endswith(b"\n\n"), event
        out.append(json.loads(data[6:]))
        assert out[-1]["type"] == name[7:]
    return out


async def stream(mock: MockProvider, model: str, **params: Any) -> tuple[list[dict[str, Any]], Usage]:
    usage = Usage()
    relay = await messages.open_stream(deployment(mock, model), {"max_tokens": 256, "messages": HELLO, **params},
                                       usage)
    return events([e async for e in relay]), usage


@pytest.mark.parametrize("model", ["anthropic/mock-claude-cached-2", "openai/mock-gpt-cached-2"])
async def test_json_answers_carry_all_four_counts(mock_provider: MockProvider, model: str) -> None:
    usage = Usage()
    raw = await messages.complete(deployment(mock_provider, model), {"max_tokens": 64, "messages": HELLO}, usage)
    answer = json.loads(raw)
    assert answer["type"] == "message" and answer["role"] == "assistant"
    assert answer["content"] == [{"type": "text", "text": f"Hello from {model.split('/')[1]}: hello there you"}]
    assert answer["stop_reason"] == "end_turn"
    assert answer["usage"] == {**answer["usage"], "input_tokens": 1, "cache_read_input_tokens": 2,
                               "cache_creation_input_tokens": 0, "output_tokens": 6}
    tokens = from_provider_usage(usage.usage)
    assert tokens is not None and (tokens.prompt, tokens.cached, tokens.completion) == (3, 2, 6)


@pytest.mark.parametrize("model", ["anthropic/mock-claude-cached-2", "openai/mock-gpt-cached-2"])
async def test_streams_end_with_the_usage_in_message_delta(mock_provider: MockProvider, model: str) -> None:
    got, usage = await stream(mock_provider, model)
    kinds = [e["type"] for e in got]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    text = "".join(e["delta"]["text"] for e in got if e["type"] == "content_block_delta")
    assert text == f"Hello from {model.split('/')[1]}: hello there you"
    final = got[-2]["usage"]
    assert {k: final[k] for k in messages.anthropic_native.USAGE_KEYS} == {
        "input_tokens": 1, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 0, "output_tokens": 6}
    tokens = from_provider_usage(usage.usage)
    assert tokens is not None and (tokens.prompt, tokens.cached, tokens.completion) == (3, 2, 6)
    assert usage.chars == len(text)  # the stream guard counts the completion as it passes


async def test_native_requests_go_up_as_sent(mock_provider: MockProvider) -> None:
    mock_provider.clear()
    params = {"max_tokens": 2048, "messages": HELLO, "system": [{"type": "text", "text": "Be brief.",
                                                                  "cache_control": {"type": "ephemeral"}}],
              "thinking": {"type": "enabled", "budget_tokens": 1024}, "top_k": 3, "service_tier": "auto",
              "metadata": {"user_id": "u-1"}, "stop_sequences": ["END"]}
    await messages.complete(deployment(mock_provider, "anthropic/mock-claude"), dict(params), Usage())
    sent = mock_provider.requests_for("mock-claude")[-1]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == PROVIDER_KEY
    assert {k: v for k, v in sent.body.items() if k not in ("model", "stream")} == params


async def test_translation_to_openai_format(mock_provider: MockProvider) -> None:
    mock_provider.clear()
    params = {"max_tokens": 100, "messages": HELLO, "system": "Be brief.", "stop_sequences": ["END"],
              "metadata": {"user_id": "u-1"}, "service_tier": "standard_only", "thinking": {"type": "disabled"}}
    await messages.complete(deployment(mock_provider, "openai/mock-gpt"), params, Usage())
    sent = mock_provider.requests_for("mock-gpt")[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"][0]["role"] == "system" and sent.body["stop"] == ["END"]
    assert sent.body["user"] == "u-1" and sent.body["service_tier"] == "default" and sent.body["max_tokens"] == 100
    assert "reasoning_effort" not in sent.body and "thinking" not in sent.body


@pytest.mark.parametrize("model", ["anthropic/mock-claude-tool", "openai/mock-gpt-tool"])
async def test_tool_use_streams_as_input_json_deltas(mock_provider: MockProvider, model: str) -> None:
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                                                    "days": {"type": "integer"}}}}]
    got, _ = await stream(mock_provider, model, tools=tools)
    start = next(e for e in got if e["type"] == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "get_weather"
    partial = "".join(e["delta"]["partial_json"] for e in got if e["type"] == "content_block_delta")
    assert json.loads(partial) == {"city": "mock", "days": 1}
    assert got[-2]["delta"]["stop_reason"] == "tool_use"


async def test_thinking_and_cache_writes_natively(mock_provider: MockProvider) -> None:
    model = "extras/mock-claude-think-cached-1-cwrite-1"
    usage = Usage()
    answer = json.loads(await messages.complete(deployment(mock_provider, model),
                                                {"max_tokens": 2048, "messages": HELLO,
                                                 "thinking": {"type": "enabled", "budget_tokens": 1024}}, usage))
    assert answer["content"][0] == {"type": "thinking", "signature": SIGNATURE,
                                    "thinking": f"Thinking about: Hello from {model[7:]}: hello there you"}
    assert answer["usage"]["cache_creation_input_tokens"] == 1 and answer["usage"]["cache_read_input_tokens"] == 1
    tokens = from_provider_usage(usage.usage)
    # the reply's 6 words and the thinking's 8 are the completion
    assert tokens is not None and (tokens.prompt, tokens.cached, tokens.cache_creation, tokens.completion) == (
        3, 1, 1, 14)
    # one uncached, one cache read, one cache write, 14 completion tokens
    assert cost_usd(tokens, PRICES) == pytest.approx(1e-6 + 2.5e-7 + 1.25e-6 + 14 * 4e-6)
    got, usage = await stream(mock_provider, model, thinking={"type": "enabled", "budget_tokens": 1024})
    deltas = [e["delta"]["type"] for e in got if e["type"] == "content_block_delta"]
    assert deltas[0] == "thinking_delta" and "signature_delta" in deltas and deltas[-1] == "text_delta"
    assert got[-2]["usage"]["cache_creation_input_tokens"] == 1  # from message_start: message_delta had none
    assert from_provider_usage(usage.usage).cache_creation == 1  # type: ignore[union-attr]


async def test_full_usage_in_message_delta_is_relayed(mock_provider: MockProvider) -> None:
    got, usage = await stream(mock_provider, "extras/mock-claude-fullusage-cwrite-2")
    assert got[-2]["usage"] == {"input_tokens": 1, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 0,
                                "output_tokens": 6}
    assert from_provider_usage(usage.usage).prompt == 3  # type: ignore[union-attr]


@pytest.mark.parametrize(("model", "status", "kind"), [
    ("anthropic/mock-claude-err-529", 529, "overloaded_error"),
    ("anthropic/mock-claude-err-503", 529, "overloaded_error"),
    ("openai/mock-gpt-err-503", 529, "overloaded_error"),
    ("anthropic/mock-claude-err-500", 502, "server_error"),
    ("anthropic/mock-claude-err-429", 429, "rate_limit_error"),
])
@pytest.mark.parametrize("streamed", [False, True])
async def test_provider_failures(mock_provider: MockProvider, model: str, status: int, kind: str,
                                 streamed: bool) -> None:
    with pytest.raises(GatewayError) as caught:
        if streamed:
            await stream(mock_provider, model)
        else:
            await messages.complete(deployment(mock_provider, model), {"max_tokens": 8, "messages": HELLO}, Usage())
    assert (caught.value.status, caught.value.type) == (status, kind)
    assert caught.value.code in ("provider_error", "rate_limit_exceeded")  # the router retries both


@pytest.mark.parametrize("model", ["anthropic/mock-claude-cut-3", "openai/mock-gpt-cut-3",
                                   "extras/mock-claude-errmid"])
async def test_a_stream_failing_midway_raises_after_its_first_events(mock_provider: MockProvider,
                                                                     model: str) -> None:
    usage = Usage()
    relay = await messages.open_stream(deployment(mock_provider, model), {"max_tokens": 64, "messages": HELLO},
                                       usage)
    seen = []
    with pytest.raises(GatewayError) as caught:
        async for event in relay:
            seen.append(event)
    assert seen and seen[0].startswith(b"event: message_start")
    assert caught.value.status in (502, 529) and caught.value.code == "provider_error"
    if "errmid" in model:
        assert caught.value.type == "overloaded_error"
        assert all(b"Overloaded" not in e for e in seen)  # the provider's own error event is not relayed


async def test_an_unsupported_parameter_is_named_as_the_client_sent_it(mock_provider: MockProvider) -> None:
    with pytest.raises(GatewayError) as caught:  # LiteLLM's adapter makes it reasoning_effort, which gpt-4o refuses
        await messages.complete(deployment(mock_provider, "openai/gpt-4o"),
                                {"max_tokens": 2048, "messages": HELLO,
                                 "thinking": {"type": "enabled", "budget_tokens": 1024}}, Usage())
    assert caught.value.status == 400 and caught.value.param == "thinking"
    assert "thinking" in caught.value.message and "reasoning_effort" not in caught.value.message


async def test_count_tokens_asks_anthropic_and_counts_locally_elsewhere(mock_provider: MockProvider) -> None:
    prompt = {"messages": HELLO, "system": "Be brief now",
              "tools": [{"name": "t", "input_schema": {"type": "object"}}]}
    mock_provider.clear()
    counted = await token_count.count_tokens(deployment(mock_provider, "anthropic/mock-claude"), prompt)
    assert counted == (3 + 3 + 1, "provider")  # the mock's count: words, plus one per tool
    sent = mock_provider.requests[-1]
    assert sent.path == "/v1/messages/count_tokens" and sent.headers["x-api-key"] == PROVIDER_KEY
    assert sent.body["system"] == "Be brief now" and sent.body["tools"] == prompt["tools"]
    local, how = await token_count.count_tokens(deployment(mock_provider, "openai/gpt-4o-mini"), prompt)
    assert how == "litellm" and local > 7  # tiktoken's count, message and tool overhead included
    fallback = await token_count.count_tokens(deployment(mock_provider, "anthropic/mock-claude-err-500"), prompt)
    assert fallback[1] == "litellm" and fallback[0] > 0


async def test_a_thinking_budget_stays_below_a_lowered_max_tokens(mock_provider: MockProvider) -> None:
    """The ledger may cap max_tokens (a consumer's budget) under the thinking budget the client asked for."""
    mock_provider.clear()
    params = {"max_tokens": 1500, "messages": HELLO, "thinking": {"type": "enabled", "budget_tokens": 4000}}
    await messages.complete(deployment(mock_provider, "anthropic/mock-claude"), params, Usage())
    assert mock_provider.requests[-1].body["thinking"] == {"type": "enabled", "budget_tokens": 1499}
    assert params["thinking"]["budget_tokens"] == 4000  # a retry starts from the request as admitted
