"""The mock provider, driven by LiteLLM itself: it must serve what LiteLLM parses from real providers."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm

from mock_provider import MockProvider

litellm.suppress_debug_info = True
KEY = "mock-test-key"
HELLO = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Say hello to the gateway"}]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProvider]:
    with MockProvider(required_key=KEY) as provider:
        yield provider


def _complete(mock: MockProvider, model: str, **kwargs: Any) -> Any:
    """litellm.acompletion against the mock; a stream is drained into a list of chunks."""
    base = mock.openai_base if model.startswith("openai/") else mock.anthropic_base
    kwargs = {"api_key": KEY, "max_tokens": 50, "max_retries": 0, "messages": HELLO, **kwargs}

    async def run() -> Any:
        response = await litellm.acompletion(model=model, api_base=base, **kwargs)
        return [chunk async for chunk in response] if kwargs.get("stream") else response

    return asyncio.run(run())


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_openai_json(mock: MockProvider) -> None:
    mock.clear()
    response = _complete(mock, "openai/mock-gpt-cached-2-reasoning-3")
    text = response.choices[0].message.content
    assert text == "Hello from mock-gpt-cached-2-reasoning-3: Say hello to the gateway"
    assert response.choices[0].finish_reason == "stop"
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 8 + 3, 18)
    assert usage.prompt_tokens_details.cached_tokens == 2
    assert usage.completion_tokens_details.reasoning_tokens == 3
    [sent] = mock.requests_for("mock-gpt-cached")
    assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.body is not None and sent.body["messages"] == HELLO


def test_openai_stream_with_usage(mock: MockProvider) -> None:
    mock.clear()
    chunks = _complete(mock, "openai/mock-gpt", stream=True, stream_options={"include_usage": True})
    assert _text(chunks) == _complete(mock, "openai/mock-gpt").choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 8  # one word per chunk
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and (usage[-1].prompt_tokens, usage[-1].completion_tokens) == (7, 8)
    assert mock.requests_for("mock-gpt")[0].body["stream_options"] == {"include_usage": True}


def test_openai_stream_cut_has_no_end(mock: MockProvider) -> None:
    body = {"model": "mock-cut-2", "stream": True, "messages": HELLO}
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream(
            "POST", f"{mock.openai_base}/chat/completions", json=body,
            headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = []
        for line in response.iter_lines():
            lines.append(line)
    data = [line for line in lines if line.startswith("data: ")]
    assert len(data) == 3 and "[DONE]" not in data[-1]  # the role chunk and two content chunks
    assert mock.active_streams == 0


def test_anthropic_json(mock: MockProvider) -> None:
    mock.clear()
    response = _complete(mock, "anthropic/mock-claude-cached-2")
    assert response.choices[0].message.content == "Hello from mock-claude-cached-2: Say hello to the gateway"
    assert response.choices[0].finish_reason == "stop"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (7, 8)
    assert response.usage.prompt_tokens_details.cached_tokens == 2
    [sent] = mock.requests_for("mock-claude")
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == KEY
    assert sent.body is not None and sent.body["system"] == [{"type": "text", "text": "Be brief"}]


def test_anthropic_stream(mock: MockProvider) -> None:
    chunks = _complete(mock, "anthropic/mock-claude", stream=True, stream_options={"include_usage": True})
    assert _text(chunks) == "Hello from mock-claude: Say hello to the gateway"
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and (usage[-1].prompt_tokens, usage[-1].completion_tokens) == (7, 8)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]


@pytest.mark.parametrize("model", ["openai/mock-tool", "anthropic/mock-tool"])
def test_tool_call(mock: MockProvider, model: str) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    # LiteLLM imports its MCP gateway (and the optional `mcp` package) whenever tools are passed
    kwargs = {"tools": tools, "_skip_mcp_handler": True}
    message = _complete(mock, model, **kwargs).choices[0]
    assert message.finish_reason == "tool_calls"
    assert message.message.tool_calls[0].function.name == "get_weather"
    assert message.message.tool_calls[0].function.arguments == '{"city": "mock"}'
    built = litellm.stream_chunk_builder(_complete(mock, model, stream=True, **kwargs)).choices[0]
    assert built.finish_reason == "tool_calls"
    assert built.message.tool_calls[0].function.arguments == '{"city": "mock"}'


@pytest.mark.parametrize("model", ["openai/mock-err-429-ra-3", "anthropic/mock-err-429-ra-3"])
def test_rate_limit_with_retry_after(mock: MockProvider, model: str) -> None:
    mock.clear()
    with pytest.raises(litellm.RateLimitError) as caught:
        _complete(mock, model)
    assert caught.value.status_code == 429
    assert caught.value.litellm_response_headers["retry-after"] == "3"
    # max_retries=0: the OpenAI SDK would otherwise retry twice, sleeping Retry-After in between
    assert len(mock.requests) == 1


@pytest.mark.parametrize("model", ["openai/mock-gpt", "anthropic/mock-claude"])
def test_wrong_key_is_401(mock: MockProvider, model: str) -> None:
    with pytest.raises(litellm.AuthenticationError) as caught:
        _complete(mock, model, api_key="not-the-key")
    assert caught.value.status_code == 401
