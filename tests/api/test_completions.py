"""``POST /v1/completions``: OpenAI's legacy text completions.

Validation against ``CreateCompletionRequest``, and the provider call through LiteLLM against the mock provider
(real HTTP: OpenAI's /v1/completions natively, Anthropic through LiteLLM's chat bridge), in-process; then end
to end with the OpenAI SDK through the harness and the real plugin server.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from conftest import wait_for_record
from llm_gateway.api.completions import ENDPOINT, PARAMETERS, parse_completion_request
from llm_gateway.config import parse_config
from llm_gateway.errors import GatewayError
from llm_gateway.providers.openai_compatible import Usage
from mock_provider import MockProvider
from openai_spec import assert_valid, require_spec

PROMPT = "Say hello to the gateway"


def parse(**body: Any) -> Any:
    return parse_completion_request(json.dumps({"model": "m", "prompt": PROMPT, **body}).encode())


def refused(body: bytes | dict[str, Any]) -> GatewayError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(GatewayError) as caught:
        parse_completion_request(raw)
    assert caught.value.status == 400
    return caught.value


def test_every_field_of_openais_request_is_admitted() -> None:
    properties = set(require_spec()["components"]["schemas"]["CreateCompletionRequest"]["properties"])
    assert properties == set(PARAMETERS) | {"model", "prompt", "stream", "stream_options"}


def test_defaults_and_prompt_shapes() -> None:
    request = parse()
    assert request.params == {"prompt": PROMPT, "max_tokens": 16}  # OpenAI's default, sent explicitly
    assert request.endpoint == "completions" and request.limit_keys == ("max_tokens",) and not request.stream
    for prompt in (PROMPT, ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert parse(prompt=prompt).params["prompt"] == prompt
    assert parse(prompt=[[1, 2], [3]]).prompt_tokens("gpt-4o-mini") == 3  # token ids count as given
    assert parse(prompt="hello world").prompt_tokens("gpt-4o-mini") == 2
    full = parse(best_of=2, n=2, echo=True, frequency_penalty=0.5, presence_penalty=-0.5, logit_bias={"50256": -100},
                 logprobs=2, max_tokens=0, seed=7, stop=["\n"], suffix="!", temperature=0.2, top_p=0.9, user="u1")
    assert full.params["max_tokens"] == 0 and full.params["suffix"] == "!"
    streamed = parse(stream=True, stream_options={"include_usage": True})
    assert streamed.stream and streamed.include_usage


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": None}, "prompt"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": [1, "a"]}, "prompt"),
    ({"model": "m", "prompt": [[1], []]}, "prompt"),
    ({"model": "m", "prompt": {"text": "x"}}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": "x", "best_of": 1, "n": 2}, "best_of"),
    ({"model": "m", "prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ({"model": "m", "prompt": "x", "n": 2, "stream": True}, "n"),
    ({"model": "m", "prompt": ["a", "b"], "stream": True}, "prompt"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "x", "logit_bias": {"1": 101}}, "logit_bias"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": "y"}}, "stream_options"),
    ({"model": "m", "prompt": "x", "messages": []}, "messages"),
    ({"model": "m", "prompt": "x", "tools": [], "zeta": 1}, "tools"),
])
def test_bad_input_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    err = refused(body)
    assert err.param == param, err.message
    if param in ("messages", "tools"):
        assert err.code == "unsupported_parameter" and param in err.message


def test_bodies_that_are_not_requests() -> None:
    assert refused(b"{not json").code == "invalid_json"
    assert refused(b"[1]").code == "invalid_json"
    assert refused(b'{"model": "m", "prompt": "x", "temperature": NaN}').code == "invalid_json"
    assert refused(("[" * 100 + "]" * 100).encode()).code == "invalid_json"


# -- the provider call, in-process, through LiteLLM against the mock provider --------------------------------

@pytest.fixture(scope="module")
def mock() -> Iterator[MockProvider]:
    with MockProvider(required_key="k") as provider:
        yield provider


def deployment(mock: MockProvider, model: str, **extra: Any) -> Any:
    base = mock.anthropic_base if model.startswith("anthropic/") else mock.openai_base
    alias = {"name": "a", "deployments": [{"model": model, "api_base": base, "api_key": "k"}], **extra}
    return parse_config({"models": [alias]}, env={}).models["a"].deployments[0]


def completion_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    """A stream chunk as the schema validates it: OpenAI's chunks carry a null finish_reason until the last,
    which the schema (shared with the JSON answer) does not allow for."""
    return {**chunk, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]}


@pytest.mark.parametrize("model", ["openai/mock-gpt", "anthropic/mock-claude"])
async def test_json_answer_is_openais_with_usage(mock: MockProvider, model: str) -> None:
    usage = Usage()
    body = json.loads(await ENDPOINT.complete(deployment(mock, model), parse(), usage))
    assert_valid("CreateCompletionResponse", body)
    name = model.split("/")[1]
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == f"Hello from {name}: {PROMPT}"
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 8
    assert usage.usage["total_tokens"] == 13 and usage.finish_reasons == ["stop"]
    upstream = mock.requests[-1]
    assert upstream.path == ("/v1/completions" if model.startswith("openai/") else "/v1/messages")


async def test_native_path_keeps_every_parameter_and_prompt(mock: MockProvider) -> None:
    request = parse(prompt=["one two", "three"], n=2, echo=True, logprobs=1, suffix="!", best_of=2, seed=3, user="u")
    body = json.loads(await ENDPOINT.complete(deployment(mock, "openai/mock-gpt"), request, Usage()))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][2]["text"].startswith("three Hello from")  # echo
    sent = mock.requests[-1].body
    assert sent["prompt"] == ["one two", "three"] and sent["n"] == 2 and sent["max_tokens"] == 16
    assert {k: sent[k] for k in ("echo", "logprobs", "suffix", "best_of", "seed", "user")} == {
        "echo": True, "logprobs": 1, "suffix": "!", "best_of": 2, "seed": 3, "user": "u"}
    body = json.loads(await ENDPOINT.complete(deployment(mock, "openai/mock-gpt"), parse(max_tokens=2), Usage()))
    assert body["choices"][0] == {"index": 0, "text": "Hello from", "logprobs": None, "finish_reason": "length"}


async def test_chat_bridge_refuses_what_it_cannot_express(mock: MockProvider) -> None:
    claude = deployment(mock, "anthropic/mock-claude")
    mock.clear()
    for request, param in ((parse(prompt=[1, 2]), "prompt"), (parse(prompt=["a", "b"]), "prompt"),
                           (parse(echo=True), "echo"), (parse(suffix="x", logprobs=1), "logprobs")):
        with pytest.raises(GatewayError) as caught:
            await ENDPOINT.complete(claude, request, Usage())
        assert caught.value.status == 400 and caught.value.param == param
    assert mock.requests == [], "nothing is sent for a request the provider cannot be asked"
    dropping = deployment(mock, "anthropic/mock-claude", drop_params=True)
    usage = Usage()
    body = json.loads(await ENDPOINT.complete(dropping, parse(prompt=["only one"], echo=True), usage))
    assert body["choices"][0]["text"] == "Hello from mock-claude: only one" and usage.dropped == ["echo"]
    assert "echo" not in mock.requests[-1].body


@pytest.mark.parametrize("model", ["openai/mock-gpt", "anthropic/mock-claude"])
@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_is_openais_chunks(mock: MockProvider, model: str, include_usage: bool) -> None:
    usage = Usage()
    request = parse(stream=True, stream_options={"include_usage": include_usage})
    events = [e async for e in await ENDPOINT.open_stream(deployment(mock, model), request, usage)]
    assert all(e.startswith(b"data: {") and e.endswith(b"\n\n") for e in events)
    chunks = [json.loads(e[6:]) for e in events]
    for chunk in chunks:
        assert_valid("CreateCompletionResponse", completion_chunk(chunk))
        assert chunk["object"] == "text_completion" and "reasoning_content" not in json.dumps(chunk)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == f"Hello from {model.split('/')[1]}: {PROMPT}"
    with_usage = [c for c in chunks if "usage" in c]
    if include_usage:
        assert with_usage == [chunks[-1]] and chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == 8
    else:
        assert with_usage == []
    assert usage.usage["prompt_tokens"] == 5 and usage.usage["completion_tokens"] == 8  # accounted either way
    assert usage.finish_reasons == ["stop"]
    if model.startswith("openai/"):
        assert mock.requests[-1].body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(("model", "status"), [("openai/mock-err-500", 502), ("openai/mock-err-429-ra-3", 429),
                                               ("openai/mock-err-400", 400), ("openai/mock-malformed", 502)])
async def test_provider_failures_map_to_gateway_errors(mock: MockProvider, model: str, status: int) -> None:
    with pytest.raises(GatewayError) as caught:
        await ENDPOINT.complete(deployment(mock, model), parse(), Usage())
    assert caught.value.status == status
    assert "mock" not in caught.value.message.lower() or status == 400  # only a provider's 400 explains itself


async def test_stream_cut_mid_way_raises(mock: MockProvider) -> None:
    events = await ENDPOINT.open_stream(deployment(mock, "openai/mock-cut-3"), parse(stream=True), Usage())
    with pytest.raises(GatewayError) as caught:
        async for _ in events:
            pass
    assert caught.value.status == 502


# -- end to end: the OpenAI SDK → the harness → the real plugin server → LiteLLM → the mock provider ----------

def records_of(server: Any, request_id: str) -> list[dict[str, Any]]:
    """Every usage record line the server logged for this request (so a double record shows)."""
    found = []
    for line in server.stderr_text().splitlines():
        start = line.find('{"ts":')
        if start >= 0 and '"event":"usage"' in line and request_id in line:
            entry = json.loads(line[start:])
            if entry.get("request_id") == request_id:
                found.append(entry)
    return found


def test_sdk_json_completion(client: openai.OpenAI, plugin_server: Any, mock_provider: MockProvider) -> None:
    raw = client.completions.with_raw_response.create(model="gpt-mock", prompt=PROMPT)
    completion = raw.parse()
    assert_valid("CreateCompletionResponse", json.loads(raw.text))
    assert completion.object == "text_completion"
    assert completion.choices[0].text == f"Hello from mock-gpt: {PROMPT}"
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 8
    assert raw.headers["X-LLM-Provider"] == "openai" and raw.headers["X-LLM-Total-Tokens"] == "13"
    assert mock_provider.requests_for("mock-gpt")[-1].path == "/v1/completions"  # natively, not via chat
    assert mock_provider.requests_for("mock-gpt")[-1].body["max_tokens"] == 16  # OpenAI's default
    wait_for_record(plugin_server, raw.headers["X-Request-ID"])
    [record] = records_of(plugin_server, raw.headers["X-Request-ID"])
    assert record["endpoint"] == "completions" and record["alias"] == "gpt-mock"
    assert record["prompt_tokens"] == 5 and record["completion_tokens"] == 8 and record["status"] == 200


def test_sdk_stream(client: openai.OpenAI, plugin_server: Any) -> None:
    with client.completions.with_streaming_response.create(model="gpt-mock", prompt=PROMPT, stream=True) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        request_id = raw.headers["X-Request-ID"]
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == f"Hello from mock-gpt: {PROMPT}"
    assert all("usage" not in c for c in chunks), "the client did not ask for usage"
    stream = client.completions.create(model="claude-mock", prompt=PROMPT, stream=True,
                                       stream_options={"include_usage": True})
    received = list(stream)
    assert "".join(c.choices[0].text for c in received if c.choices) == f"Hello from mock-claude: {PROMPT}"
    assert received[-1].choices == [] and received[-1].usage.completion_tokens == 8
    wait_for_record(plugin_server, request_id)
    [record] = records_of(plugin_server, request_id)
    assert record["endpoint"] == "completions" and record["stream"] is True
    assert record["completion_tokens"] == 8 and record["estimated"] is False


def test_sdk_bad_input_is_a_400(client: openai.OpenAI, mock_provider: MockProvider) -> None:
    mock_provider.clear()
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="gpt-mock", prompt=PROMPT, temperature=5)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="gpt-mock", prompt=PROMPT, extra_body={"messages": []})
    assert caught.value.body["code"] == "unsupported_parameter" and caught.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as caught:  # the chat bridge cannot echo: refused, not sent
        client.completions.create(model="claude-mock", prompt=PROMPT, echo=True)
    assert caught.value.body["param"] == "echo"
    assert mock_provider.requests == []
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-alias", prompt=PROMPT)


def test_provider_500_is_retried(client: openai.OpenAI, mock_provider: MockProvider, plugin_server: Any) -> None:
    marker = f"retry-{uuid.uuid4().hex}"
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="provider-500", prompt=f"{PROMPT} {marker}")
    assert caught.value.status_code == 502 and caught.value.body["code"] == "provider_error"
    assert len(mock_provider.requests_with(marker)) == 3  # the gateway's 2 retries: 3 provider calls
    assert caught.value.response.headers["X-LLM-Attempts"] == "3"
    request_id = caught.value.response.headers["X-Request-ID"]
    wait_for_record(plugin_server, request_id)
    [record] = records_of(plugin_server, request_id)
    assert record["endpoint"] == "completions" and record["status"] == 502 and record["attempts"] == 3


def test_demo_answers_text_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="demo", prompt="hello demo", max_tokens=50)
    assert completion.choices[0].text.startswith("Hello from the kong-llm-gateway demo provider")
    chunks = list(client.completions.create(model="demo", prompt="hello demo", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices).endswith("You said: hello demo")
