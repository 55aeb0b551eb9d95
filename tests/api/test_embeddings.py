"""``POST /v1/embeddings`` end to end: the OpenAI SDK → the Kong-side harness → the real plugin server → the lean
OpenAI path or LiteLLM → the mock provider playing OpenAI's and Cohere's embedding wires.

Nothing is mocked but the providers. Vectors are the mock's deterministic ones (``mock_vector``), so every
float the client decodes is checked against what the provider sent.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import litellm
import openai
import pytest

from conftest import (
    ALICE_KEY,
    BOB_KEY,
    PROVIDER_KEY,
    REDIS_PREFIX,
    gateway_config,
    route_to,
    wait_for_record,
)
from kong_harness import KongHarness, PluginServerProcess
from llm_gateway.api.embeddings import MAX_INPUTS, parse_embedding_request
from llm_gateway.errors import GatewayError
from mock_embeddings import COHERE_MAX_TEXTS, as_base64, mock_vector
from mock_provider import MockProvider
from openai_spec import assert_valid


def _post(kong: KongHarness, body: Any, key: str = ALICE_KEY) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{kong.url}/v1/embeddings", content=raw, timeout=30,
                      headers={"apikey": key, "Content-Type": "application/json"})


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def _decoded(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer with base64 embeddings decoded as the OpenAI SDK decodes them (float32, little-endian)."""
    answer = copy.deepcopy(answer)
    for item in answer["data"]:
        if isinstance(item["embedding"], str):
            raw = base64.b64decode(item["embedding"])
            item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return answer


def _conforms(answer: dict[str, Any]) -> None:
    """OpenAI's CreateEmbeddingResponse (its schema types ``embedding`` as floats; base64 decoded first)."""
    assert_valid("CreateEmbeddingResponse", _decoded(answer))
    assert set(answer) == {"object", "data", "model", "usage"}
    assert set(answer["usage"]) == {"prompt_tokens", "total_tokens"}


def _secrets_absent(response: httpx.Response) -> None:
    shown = response.text + json.dumps(dict(response.headers))
    for secret in (PROVIDER_KEY, ALICE_KEY, BOB_KEY):
        assert secret not in shown


def _record_lines(server: PluginServerProcess, request_id: str) -> list[dict[str, Any]]:
    lines = []
    for line in server.stderr_text().splitlines():
        start = line.find('{"ts":')
        if start >= 0 and '"event":"usage"' in line and request_id in line:
            entry = json.loads(line[start:])
            if entry.get("request_id") == request_id:
                lines.append(entry)
    return lines


def _metric(server: PluginServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"http://{server.metrics}/metrics", timeout=10).text  # type: ignore[attr-defined]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- the SDK, both encodings, every input form --------------------------------------------------------------

def test_a_string_through_the_sdk_which_asks_base64_and_decodes_it(client: openai.OpenAI,
                                                                   mock_provider: MockProvider) -> None:
    mock_provider.clear()
    raw = client.embeddings.with_raw_response.create(model="embed-mock", input="hello embeddings")
    result = raw.parse()
    assert result.object == "list" and result.model == "mock-embed"
    assert [e.index for e in result.data] == [0]
    assert result.data[0].embedding == mock_vector("hello embeddings")  # exact: the mock's values are float32
    assert result.usage.prompt_tokens == 2 and result.usage.total_tokens == 2
    sent = mock_provider.requests_for("mock-embed")[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.body == {"model": "mock-embed", "input": "hello embeddings", "encoding_format": "base64"}
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert raw.headers["X-LLM-Provider"] == "openai" and raw.headers["X-LLM-Model"] == "mock-embed"
    assert raw.headers["X-LLM-Attempts"] == "1" and raw.headers["X-LLM-Prompt-Tokens"] == "2"


def test_an_array_of_strings_as_floats_conforms_to_openais_schema(kong: KongHarness) -> None:
    texts = ["first text", "the second one", "3"]
    response = _post(kong, {"model": "embed-mock", "input": texts, "encoding_format": "float"})
    assert response.status_code == 200, response.text
    answer = response.json()
    _conforms(answer)
    assert [d["embedding"] for d in answer["data"]] == [mock_vector(t) for t in texts]
    assert [d["index"] for d in answer["data"]] == [0, 1, 2]
    assert answer["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    _secrets_absent(response)


@pytest.mark.parametrize(("tokens", "items"), [
    ([1212, 318, 257], [[1212, 318, 257]]),
    ([[1212, 318], [257, 1332, 13]], [[1212, 318], [257, 1332, 13]]),
])
def test_token_ids_go_up_as_sent(client: openai.OpenAI, mock_provider: MockProvider, tokens: list,
                                 items: list[list[int]]) -> None:
    result = client.embeddings.create(model="embed-mock", input=tokens, encoding_format="float")
    assert [e.embedding for e in result.data] == [mock_vector(item) for item in items]
    assert result.usage.prompt_tokens == sum(map(len, items))
    assert mock_provider.requests_for("mock-embed")[-1].body["input"] == tokens


def test_base64_is_byte_for_byte_what_openai_sends(kong: KongHarness) -> None:
    """Relayed from an OpenAI-format provider, and encoded by the gateway for Cohere: the same bytes."""
    for alias in ("embed-mock", "embed-cohere"):
        response = _post(kong, {"model": alias, "input": ["alpha beta", "gamma"], "encoding_format": "base64"})
        assert response.status_code == 200, response.text
        answer = response.json()
        _conforms(answer)
        assert [d["embedding"] for d in answer["data"]] == [as_base64(mock_vector(t)) for t in ("alpha beta", "gamma")]


def test_dimensions_pass_through(client: openai.OpenAI, mock_provider: MockProvider) -> None:
    result = client.embeddings.create(model="embed-mock", input="short", dimensions=4)
    assert result.data[0].embedding == mock_vector("short", 4)
    assert mock_provider.requests_for("mock-embed")[-1].body["dimensions"] == 4
    result = client.embeddings.create(model="embed-cohere-v4", input="short", dimensions=256)
    assert result.data[0].embedding == mock_vector("short", 256)
    assert mock_provider.requests_for("embed-v4.0")[-1].body["output_dimension"] == 256  # Cohere's name for it


def test_dimensions_where_litellm_says_the_model_cannot_are_a_400_naming_them(
        kong: KongHarness, mock_provider: MockProvider) -> None:
    mock_provider.clear()
    error = _error(_post(kong, {"model": "embed-ada", "input": "x", "dimensions": 8}), 400, "unsupported_parameter")
    assert error["param"] == "dimensions" and "dimensions" in error["message"]
    assert "litellm" not in error["message"].lower()
    assert not mock_provider.requests_for("ada"), "refused before any provider call"
    assert _post(kong, {"model": "embed-ada", "input": "x"}).status_code == 200


# --- a provider of another wire format: Cohere through LiteLLM ---------------------------------------------

def test_cohere_is_spoken_on_its_own_wire_and_answered_in_openais(
        client: openai.OpenAI, mock_provider: MockProvider, plugin_server: PluginServerProcess) -> None:
    mock_provider.clear()
    texts = ["a document about the gateway", "another one"]
    raw = client.embeddings.with_raw_response.create(model="embed-cohere", input=texts)  # the SDK asks base64
    result = raw.parse()
    assert [e.embedding for e in result.data] == [mock_vector(t) for t in texts]
    assert result.model == "embed-english-v3.0"
    assert result.usage.prompt_tokens == 7  # Cohere's meta.billed_units.input_tokens
    sent = mock_provider.requests_for("embed-english-v3.0")[-1]
    assert sent.path == "/v2/embed" and sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert sent.body == {"model": "embed-english-v3.0", "texts": texts, "input_type": "search_document",
                         "embedding_types": ["float"]}
    assert raw.headers["X-LLM-Provider"] == "cohere"
    price = litellm.model_cost["embed-english-v3.0"]["input_cost_per_token"]
    assert float(raw.headers["X-LLM-Cost-USD"]) == pytest.approx(7 * price, abs=1e-8)
    record = wait_for_record(plugin_server, raw.headers["X-Request-ID"])
    assert record["endpoint"] == "embeddings" and record["provider"] == "cohere"
    assert record["prompt_tokens"] == 7 and record["completion_tokens"] == 0 and record["estimated"] is False
    assert record["cost_usd"] == pytest.approx(7 * price, rel=1e-9)


def test_cohere_refuses_what_litellm_cannot_send_unless_the_alias_drops_it(
        kong: KongHarness, mock_provider: MockProvider) -> None:
    mock_provider.clear()
    error = _error(_post(kong, {"model": "embed-cohere", "input": "x", "user": "end-user-1"}), 400,
                   "unsupported_parameter")
    assert error["param"] == "user"
    error = _error(_post(kong, {"model": "embed-cohere", "input": [[1, 2, 3]]}), 400)
    assert error["param"] == "input" and "token ids" in error["message"]
    assert not mock_provider.requests_for("embed-english-v3.0"), "refused before any provider call"
    response = _post(kong, {"model": "embed-cohere-lenient", "input": "x", "user": "end-user-1"})
    assert response.status_code == 200, response.text
    assert response.headers["X-LLM-Dropped-Params"] == "user"
    assert "user" not in mock_provider.requests_for("embed-english-v3.0")[-1].body


def test_cohere_output_dimension_on_a_v3_model_is_cohere_s_own_400(kong: KongHarness,
                                                                    mock_provider: MockProvider) -> None:
    """LiteLLM maps dimensions for Cohere; the v3 model itself refuses it: the provider's 400, not retried."""
    mock_provider.clear()
    response = _post(kong, {"model": "embed-cohere", "input": "x", "dimensions": 256})
    error = _error(response, 400, "provider_rejected_request")
    assert "output_dimension is only supported for embed-v4.0" in error["message"]
    assert "{" not in error["message"], "the provider's sentence, not its JSON"
    assert response.headers["X-LLM-Attempts"] == "1"
    assert len(mock_provider.requests_for("embed-english-v3.0")) == 1


# --- routing: retries, fallbacks, provider 400s -------------------------------------------------------------

def test_a_provider_500_is_retried_on_the_next_deployment(kong: KongHarness, mock_provider: MockProvider) -> None:
    mock_provider.clear()
    response = _post(kong, {"model": "embed-retried", "input": "retry me"})
    assert response.status_code == 200, response.text
    assert response.headers["X-LLM-Attempts"] == "2"
    assert response.headers["X-LLM-Deployment"] == "embed-retried#1"
    assert response.headers["X-LLM-Provider"] == "openai"
    assert len(mock_provider.requests_for("mock-embed-retried-err-500")) == 1
    assert response.json()["data"][0]["embedding"] == mock_vector("retry me")


def test_a_failing_alias_falls_back(kong: KongHarness, mock_provider: MockProvider) -> None:
    mock_provider.clear()
    response = _post(kong, {"model": "embed-fallback", "input": "fall back"})
    assert response.status_code == 200, response.text
    assert response.headers["X-LLM-Fallback"] == "embed-mock"
    failed = len(mock_provider.requests_for("mock-embed-fallback-err-503"))
    assert failed >= 1 and response.headers["X-LLM-Attempts"] == str(failed + 1)
    _conforms(response.json())


@pytest.mark.parametrize("alias", ["embed-400", "embed-cohere-400"])
def test_a_provider_400_is_the_clients_and_not_retried(kong: KongHarness, mock_provider: MockProvider,
                                                       alias: str) -> None:
    mock_provider.clear()
    response = _post(kong, {"model": alias, "input": "bad for the provider"})
    error = _error(response, 400, "provider_rejected_request")
    assert "Mock error 400" in error["message"]
    assert response.headers["X-LLM-Attempts"] == "1"
    assert len(mock_provider.requests_for("err-400")) == 1
    _secrets_absent(response)


# --- bad input: a precise 400, never a 500 ------------------------------------------------------------------

BAD_REQUESTS = [
    ("not json", b"{input: x", "invalid_json", None),
    ("json array", b"[]", "invalid_json", None),
    ("no model", {"input": "x"}, "invalid_request", "model"),
    ("no input", {"model": "embed-mock"}, "invalid_request", "input"),
    ("null input", {"model": "embed-mock", "input": None}, "invalid_request", "input"),
    ("empty string", {"model": "embed-mock", "input": ""}, "invalid_request", "input"),
    ("empty array", {"model": "embed-mock", "input": []}, "invalid_request", "input"),
    ("input an object", {"model": "embed-mock", "input": {"text": "x"}}, "invalid_request", "input"),
    ("input a number", {"model": "embed-mock", "input": 7}, "invalid_request", "input"),
    ("empty string in array", {"model": "embed-mock", "input": ["a", ""]}, "invalid_request", "input[1]"),
    ("mixed strings and ids", {"model": "embed-mock", "input": ["a", 1]}, "invalid_request", "input[1]"),
    ("negative token id", {"model": "embed-mock", "input": [1, -2]}, "invalid_request", "input[1]"),
    ("float token id", {"model": "embed-mock", "input": [1, 2.5]}, "invalid_request", "input[1]"),
    ("boolean token id", {"model": "embed-mock", "input": [True]}, "invalid_request", "input[0]"),
    ("huge token id", {"model": "embed-mock", "input": [2 ** 40]}, "invalid_request", "input[0]"),
    ("empty token array", {"model": "embed-mock", "input": [[1], []]}, "invalid_request", "input[1]"),
    ("bad id in token array", {"model": "embed-mock", "input": [[1], [2, "x"]]}, "invalid_request",
     "input[1][1]"),
    ("array of objects", {"model": "embed-mock", "input": [{"t": 1}]}, "invalid_request", "input[0]"),
    ("too many inputs", {"model": "embed-mock", "input": ["x"] * (MAX_INPUTS + 1)}, "invalid_request", "input"),
    ("dimensions zero", {"model": "embed-mock", "input": "x", "dimensions": 0}, "invalid_request", "dimensions"),
    ("dimensions text", {"model": "embed-mock", "input": "x", "dimensions": "8"}, "invalid_request",
     "dimensions"),
    ("dimensions float", {"model": "embed-mock", "input": "x", "dimensions": 8.5}, "invalid_request",
     "dimensions"),
    ("encoding int8", {"model": "embed-mock", "input": "x", "encoding_format": "int8"}, "invalid_request",
     "encoding_format"),
    ("user a number", {"model": "embed-mock", "input": "x", "user": 42}, "invalid_request", "user"),
    ("stream", {"model": "embed-mock", "input": "x", "stream": True}, "unsupported_parameter", "stream"),
    ("unknown field", {"model": "embed-mock", "input": "x", "input_type": "query"}, "unsupported_parameter",
     "input_type"),
]


@pytest.mark.parametrize(("case", "body", "code", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_precise_400(kong: KongHarness, mock_provider: MockProvider, case: str, body: Any,
                                        code: str, param: str | None) -> None:
    marker = f"bad-{uuid.uuid4().hex}"
    response = _post(kong, body)
    error = _error(response, 400, code)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert not mock_provider.requests_with(marker)
    _secrets_absent(response)


def test_unknown_alias_is_404_and_the_sdk_sees_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.embeddings.create(model="no-such-embedder", input="x")
    assert raised.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model="embed-mock", input=[])
    assert raised.value.body["param"] == "input"


def test_cohere_s_text_limit_is_the_providers_400_not_a_gateway_500(kong: KongHarness) -> None:
    error = _error(_post(kong, {"model": "embed-cohere", "input": ["x"] * (COHERE_MAX_TEXTS + 1)}), 400,
                   "provider_rejected_request")
    assert "at most 96" in error["message"]


# --- accounting: one record, tokens, cost, metrics, budgets -------------------------------------------------

def test_one_usage_record_with_prompt_tokens_cost_and_the_tokens_metric(
        client: openai.OpenAI, plugin_server: PluginServerProcess) -> None:
    before = _metric(plugin_server, "llm_gateway_tokens_total", alias="embed-3-small", kind="prompt",
                     consumer="alice")
    texts = ["one two three", "four five"]
    raw = client.embeddings.with_raw_response.create(model="embed-3-small", input=texts, encoding_format="float")
    result = raw.parse()
    assert result.usage.prompt_tokens == 5
    price = litellm.model_cost["text-embedding-3-small"]["input_cost_per_token"]
    assert float(raw.headers["X-LLM-Cost-USD"]) == pytest.approx(5 * price, abs=1e-9)
    request_id = raw.headers["X-Request-ID"]
    record = wait_for_record(plugin_server, request_id)
    assert record["endpoint"] == "embeddings" and record["alias"] == "embed-3-small"
    assert record["consumer"] == "alice" and record["status"] == 200 and record["stream"] is False
    assert record["prompt_tokens"] == 5 and record["completion_tokens"] == 0 and record["total_tokens"] == 5
    assert record["cost_usd"] == pytest.approx(5 * price, rel=1e-9)
    assert len(_record_lines(plugin_server, request_id)) == 1, "recorded exactly once"
    after = _metric(plugin_server, "llm_gateway_tokens_total", alias="embed-3-small", kind="prompt",
                    consumer="alice")
    assert after - before == 5


def test_usage_no_provider_reported_is_counted_and_marked_estimated(
        kong: KongHarness, plugin_server: PluginServerProcess) -> None:
    response = _post(kong, {"model": "embed-no-usage", "input": ["count these words please"]})
    assert response.status_code == 200, response.text
    answer = response.json()
    _conforms(answer)  # usage is required by OpenAI's schema: the gateway's count fills it
    prompt = answer["usage"]["prompt_tokens"]
    assert prompt == 4
    assert response.headers["X-LLM-Usage-Estimated"] == "true"
    record = wait_for_record(plugin_server, response.headers["X-Request-ID"])
    assert record["estimated"] is True and record["prompt_tokens"] == prompt


@pytest.fixture(scope="module")
def tight_budget(plugin_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    """The test route with a budget of its own (its own Redis prefix), so no other test has spent it."""
    config = gateway_config(mock_provider)
    prefix = f"{REDIS_PREFIX}embeddings-{uuid.uuid4().hex[:8]}:"
    config["redis"] = {**config["redis"], "key_prefix": prefix, "usage_stream": f"{prefix}usage"}
    config["budgets"] = [{"name": "bob-embeddings", "window": "hour", "tokens": 40, "consumers": ["bob"]}]
    with route_to(plugin_server, config) as harness:
        yield harness


def test_a_budget_consumer_gets_429_budget_exceeded_when_over(tight_budget: KongHarness) -> None:
    body = {"model": "embed-mock", "input": "ten words of text to embed for the budget test"}
    for _ in range(20):
        response = _post(tight_budget, body, key=BOB_KEY)
        if response.status_code == 429:
            break
        assert response.status_code == 200, response.text
        assert response.headers["X-RateLimit-Limit-Tokens"] == "40"
    else:
        pytest.fail("the budget never ran out")
    error = _error(response, 429, "budget_exceeded")
    assert error["type"] == "rate_limit_error" and int(response.headers["Retry-After"]) >= 1
    assert _post(tight_budget, body).status_code == 200  # alice has no budget here


# --- the demo provider --------------------------------------------------------------------------------------

def test_the_demo_provider_embeds_without_a_key(client: openai.OpenAI) -> None:
    texts = ["the cat sat on the mat", "the cat sat on a mat", "quarterly revenue grew"]
    result = client.embeddings.create(model="demo", input=texts)
    vectors = [e.embedding for e in result.data]
    assert all(len(v) == 256 and math.isclose(math.fsum(x * x for x in v), 1, rel_tol=1e-5) for v in vectors)

    def cosine(a: list[float], b: list[float]) -> float:
        return math.fsum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    again = client.embeddings.create(model="demo", input=texts[0], dimensions=64, encoding_format="float")
    assert len(again.data[0].embedding) == 64
    assert client.embeddings.create(model="demo", input=texts[0], dimensions=64).data[0].embedding == \
        pytest.approx(again.data[0].embedding, abs=1e-7)


# --- parsing, without a server ------------------------------------------------------------------------------

def test_parse_keeps_what_was_set_and_counts_inputs() -> None:
    request = parse_embedding_request(b'{"model": "m", "input": ["a b", "c"], "dimensions": 3, "user": null}')
    assert request.params == {"input": ["a b", "c"], "dimensions": 3}
    assert request.count == 2 and request.endpoint == "embeddings" and request.stream is False
    assert request.limit_keys == ()
    assert parse_embedding_request(b'{"model": "m", "input": [1, 2, 3]}').count == 1
    assert parse_embedding_request(b'{"model": "m", "input": [1, 2, 3]}').prompt_tokens("gpt-4o") == 3
    assert parse_embedding_request(b'{"model": "m", "input": [[1], [2, 3]]}').prompt_tokens("gpt-4o") == 3
    many = parse_embedding_request(json.dumps({"model": "m", "input": ["hello world"] * 100}).encode())
    assert 190 <= many.prompt_tokens("text-embedding-3-small") <= 210


def test_open_stream_is_unreachable_and_says_so() -> None:
    import asyncio

    from llm_gateway.api.embeddings import ENDPOINT

    request = parse_embedding_request(b'{"model": "m", "input": "x"}')
    with pytest.raises(GatewayError) as raised:
        asyncio.run(ENDPOINT.open_stream(None, request, None))  # type: ignore[arg-type]
    assert raised.value.status == 400
