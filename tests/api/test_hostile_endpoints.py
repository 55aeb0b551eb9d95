"""Generated bodies, valid-ish and hostile, against every endpoint besides chat (which has its own sweep in
test_hostile_input.py): always an answer below 500, an error in the endpoint's own format (Anthropic's under
/v1/messages, OpenAI's elsewhere) with no Python or LiteLLM internals in it, and never a cooled deployment.

The bodies mix each endpoint's own vocabulary (field names with values of any JSON type) with junk, so most
reach deep into validation; ``HOSTILE_EXAMPLES`` (default 250) sets the examples per endpoint.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ALICE_KEY, MAX_BODY_BYTES, REDIS_URL, route_to
from kong_harness import KongHarness, PluginServerProcess
from mock_provider import MockProvider

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "250"))
INTERNALS = re.compile(
    r"Traceback|object has no attribute|object is not \w+|NoneType|KeyError|TypeError|ValueError|AttributeError"
    r"|RecursionError|litellm\.|LiteLLM|pydantic|validation error for|<class |0x[0-9a-f]{8,}|File \"",
    re.IGNORECASE)

# per endpoint: the path, the fields its clients send, a minimal valid body (model filled in per alias)
ENDPOINTS: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "embeddings": ("/v1/embeddings", ["input", "dimensions", "encoding_format", "user"], {"input": "hi"}),
    "messages": ("/v1/messages", ["messages", "max_tokens", "system", "tools", "tool_choice", "thinking",
                                  "temperature", "top_p", "top_k", "stop_sequences", "stream", "metadata"],
                 {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
    "count_tokens": ("/v1/messages/count_tokens", ["messages", "system", "tools", "tool_choice", "thinking"],
                     {"messages": [{"role": "user", "content": "hi"}]}),
    "responses": ("/v1/responses", ["input", "instructions", "tools", "tool_choice", "text", "max_output_tokens",
                                    "temperature", "top_p", "reasoning", "metadata", "stream", "store",
                                    "previous_response_id", "parallel_tool_calls"], {"input": "hi"}),
    "completions": ("/v1/completions", ["prompt", "max_tokens", "temperature", "n", "stream", "logprobs", "echo",
                                        "stop", "suffix", "best_of", "logit_bias", "seed"], {"prompt": "hi"}),
}
ALIASES = ["gpt", "claude"]


def hostile_config(mock: MockProvider) -> dict[str, Any]:
    prefix = f"llmgw-test-hostile-ep-{secrets.token_hex(4)}:"

    def deployment(model: str, api_base: str) -> dict[str, Any]:
        return {"model": model, "api_base": api_base, "api_key_env": "MOCK_PROVIDER_KEY"}

    return {
        "max_body_bytes": MAX_BODY_BYTES,
        "redis": {"url": REDIS_URL, "key_prefix": prefix, "usage_stream": f"{prefix}usage"},
        "routing": {"backoff_initial": 0.01, "backoff_max": 0.2},
        "models": [
            {"name": "gpt", "deployments": [deployment("openai/mock-gpt-hostile", mock.openai_base)]},
            {"name": "claude", "deployments": [deployment("anthropic/mock-claude-hostile", mock.anthropic_base)]},
        ],
    }


@pytest.fixture(scope="module")
def route(plugin_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    with route_to(plugin_server, hostile_config(mock_provider)) as harness:
        yield harness


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def check_answer(endpoint: str, response: httpx.Response, sent: bytes) -> None:
    assert response.status_code < 500, f"{response.status_code} for {sent[:300]!r}: {response.text[:500]}"
    if response.status_code == 200:
        return
    body = response.json()
    if endpoint in ("messages", "count_tokens"):
        assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}, body
        message = body["error"]["message"]
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        message = body["error"]["message"]
    assert message
    text = sent.decode("utf-8", "replace")
    for match in INTERNALS.finditer(message):
        assert match.group(0) in text, f"internal detail in {message!r}"


json_leaf = st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70) \
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
block = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking",
                                                        "input_text", "input_image", "function_call",
                                                        "function_call_output", "message", "weird", ""])},
                              optional={"text": json_value, "content": json_value, "role": json_value,
                                        "source": json_value, "id": json_value, "input": json_value,
                                        "call_id": json_value, "output": json_value, "name": json_value})
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", 3])},
                                optional={"content": st.text(max_size=20) | st.lists(block, max_size=3)
                                          | json_value})


def body_for(endpoint: str) -> st.SearchStrategy[bytes]:
    _, fields, minimal = ENDPOINTS[endpoint]
    value = json_value | st.lists(message, max_size=3) | st.lists(block, max_size=3) | st.integers(-5, 5000)
    extra = st.dictionaries(st.sampled_from([*fields, "junk", "model"]), value, max_size=4)

    def build(alias: str, keep_minimal: bool, changes: dict[str, Any]) -> bytes:
        body = {"model": alias, **(minimal if keep_minimal else {}), **changes}
        return json.dumps(body).encode()

    return st.builds(build, st.sampled_from(ALIASES), st.booleans(), extra) | st.binary(max_size=64)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_generated_bodies_never_get_a_500_and_errors_keep_the_endpoints_format(
        route: KongHarness, http: httpx.Client, endpoint: str) -> None:
    path = ENDPOINTS[endpoint][0]
    statuses: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body_for(endpoint))
    def sweep(raw: bytes) -> None:
        response = http.post(f"{route.url}{path}", content=raw,
                             headers={"x-api-key": ALICE_KEY, "Content-Type": "application/json",
                                      "anthropic-version": "2023-06-01"})
        statuses.append(response.status_code)
        check_answer(endpoint, response, raw)

    sweep()
    # the sweep reached both sides: some bodies were served, most were refused
    assert 200 in statuses and 400 in statuses, sorted(set(statuses))
