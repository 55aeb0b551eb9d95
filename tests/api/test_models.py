"""``GET /v1/models`` and ``GET /v1/models/{id}``: OpenAI's list format, only the aliases a consumer may use, with
what LiteLLM knows of their deployments, computed once per config.

The endpoint's own answers are checked in-process first (real LiteLLM model information, real configs), then
end to end with the OpenAI SDK through the harness and the real plugin server.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from conftest import (
    ALICE_KEY,
    BOB_KEY,
    PRICE,
    PROVIDER_KEY,
    WRONG_PROVIDER_KEY,
    gateway_config,
    route_to,
    usage_records,
)
from llm_gateway.api import models
from llm_gateway.api.base import Admitted
from llm_gateway.config import parse_config
from llm_gateway.errors import GatewayError
from llm_gateway.providers import model_info
from openai_spec import assert_valid

SECRET = "models-test-key-" + secrets.token_hex(12)  # made per run, as conftest.py does: no key in the repo
PASSWORD = secrets.token_hex(6)
SECRET_BASE = f"https://user:{PASSWORD}@llm.internal.example/v1"
RAW = {"models": [
    {"name": "gpt-4o-mini", "deployments": [{"model": "openai/gpt-4o-mini", "api_key": SECRET,
                                             "api_base": SECRET_BASE}]},
    {"name": "claude", "deployments": [{"model": "anthropic/claude-haiku-4-5", "api_key": SECRET}],
     "fallbacks": ["gpt-4o-mini"], "context_window_fallbacks": ["secret-big"]},
    {"name": "mixed", "deployments": [{"model": "openai/gpt-4o-mini"}, {"model": "anthropic/claude-haiku-4-5"}],
     "strategy": "least-busy", "drop_params": True},
    {"name": "demo", "deployments": [{"model": "demo/echo"}]},
    {"name": "priced-demo", "deployments": [{"model": "demo/echo", "price": {"input_cost_per_token": 1e-6,
                                                                             "output_cost_per_token": 4e-6}}]},
    {"name": "private", "deployments": [{"model": "openai/our-private-finetune"}]},
    {"name": "half-known", "deployments": [{"model": "openai/gpt-4o-mini"}, {"model": "openai/our-private-finetune"}]},
    {"name": "secret-big", "deployments": [{"model": "openai/gpt-4o-mini", "price": {"input_cost_per_token": 2e-6}}]},
    {"name": "auto", "route_by_complexity": {"strong": "claude", "weak": "gpt-4o-mini", "threshold": 0.4}},
], "model_access": [{"consumers": ["bob"], "models": ["auto", "gpt-4o-mini", "claude"]}]}


def admitted(config: Any, username: str | None, model_id: str | None = None) -> Admitted:
    match = {"model_id": model_id} if model_id is not None else {}
    return Admitted(config=config, consumer_username=username, consumer_id=None, body=b"", request_id="r", match=match)


async def listing(config: Any, username: str | None) -> dict[str, Any]:
    return json.loads(await models.ENDPOINT.answer(admitted(config, username)))


async def retrieve(config: Any, username: str | None, model_id: str) -> dict[str, Any]:
    return json.loads(await models.RETRIEVE_ENDPOINT.answer(admitted(config, username, model_id)))


@pytest.fixture
def config() -> Any:
    return parse_config(RAW, env={})  # a fresh config object (and catalog) per test


async def test_list_is_openais_format_with_every_alias(config: Any) -> None:
    body = await listing(config, "alice")
    assert_valid("ListModelsResponse", body)
    assert [m["id"] for m in body["data"]] == [a["name"] for a in RAW["models"]]  # config order
    for model in body["data"]:
        assert_valid("Model", model)
        assert model["object"] == "model" and model["created"] == 0
    owners = {m["id"]: m["owned_by"] for m in body["data"]}
    assert owners["gpt-4o-mini"] == "openai" and owners["mixed"] == "openai,anthropic"
    assert owners["demo"] == "demo" and owners["auto"] == "anthropic,openai"


async def test_deployment_facts_come_from_litellm(config: Any) -> None:
    import litellm

    entry = await retrieve(config, "alice", "gpt-4o-mini")
    extension = entry["llm_gateway"]
    info = litellm.get_model_info("openai/gpt-4o-mini")
    [deployment] = extension["deployments"]
    assert deployment["provider"] == "openai" and deployment["model"] == "gpt-4o-mini"
    assert deployment["mode"] == "chat"
    assert deployment["context_window"] == info["max_input_tokens"] == extension["context_window"]
    assert deployment["max_output_tokens"] == info["max_output_tokens"] == extension["max_output_tokens"]
    assert deployment["input_cost_per_token"] == info["input_cost_per_token"]
    assert deployment["output_cost_per_token"] == info["output_cost_per_token"]
    assert deployment["price_source"] == "litellm"
    assert deployment["supports"] == {
        "vision": litellm.supports_vision("openai/gpt-4o-mini"),
        "tools": litellm.supports_function_calling("openai/gpt-4o-mini"),
        "structured_output": litellm.supports_response_schema("openai/gpt-4o-mini"),
        "reasoning": litellm.utils.supports_reasoning("openai/gpt-4o-mini"),
        "prompt_caching": litellm.utils.supports_prompt_caching("openai/gpt-4o-mini")}
    assert extension["strategy"] == "weighted" and extension["routing"] is None


async def test_alias_guarantees_what_every_deployment_does(config: Any) -> None:
    mixed = (await retrieve(config, "alice", "mixed"))["llm_gateway"]
    openai_side, claude_side = mixed["deployments"]
    assert mixed["context_window"] == min(openai_side["context_window"], claude_side["context_window"])
    assert mixed["max_output_tokens"] == min(openai_side["max_output_tokens"], claude_side["max_output_tokens"])
    assert claude_side["supports"]["reasoning"] is True and openai_side["supports"]["reasoning"] is False
    assert mixed["supports"]["reasoning"] is False  # one deployment lacks it
    assert mixed["supports"]["vision"] is True  # both have it
    assert mixed["strategy"] == "least-busy" and mixed["drop_params"] is True
    # a deployment LiteLLM does not know makes the alias's limits unknown, and its capabilities unknown unless
    # a known deployment already lacks them
    half = (await retrieve(config, "alice", "half-known"))["llm_gateway"]
    assert half["context_window"] is None and half["max_output_tokens"] is None
    assert half["supports"]["vision"] is None and half["supports"]["reasoning"] is False


async def test_unknown_model_shows_nulls_and_demo_and_price_overrides_show(config: Any) -> None:
    private = (await retrieve(config, "alice", "private"))["llm_gateway"]
    [deployment] = private["deployments"]
    assert deployment["model"] == "our-private-finetune" and deployment["mode"] is None
    assert deployment["context_window"] is None and deployment["input_cost_per_token"] is None
    assert set(deployment["supports"].values()) == {None} and deployment["price_source"] is None
    demo = (await retrieve(config, "alice", "demo"))["llm_gateway"]["deployments"][0]
    assert (demo["provider"], demo["model"], demo["mode"]) == ("demo", "echo", "chat")
    assert set(demo["supports"].values()) == {False}  # the gateway's own echo provider honours none of them
    assert demo["input_cost_per_token"] is None  # as its usage records say: no price
    priced = (await retrieve(config, "alice", "priced-demo"))["llm_gateway"]["deployments"][0]
    assert priced["input_cost_per_token"] == 1e-6 and priced["output_cost_per_token"] == 4e-6
    assert priced["price_source"] == "override"
    # a partial override: the overridden field, LiteLLM's price for the others (what the ledger bills)
    partial = (await retrieve(config, "alice", "secret-big"))["llm_gateway"]["deployments"][0]
    assert partial["input_cost_per_token"] == 2e-6 and partial["output_cost_per_token"] == 6e-7


async def test_routing_alias_describes_both_tiers(config: Any) -> None:
    auto = (await retrieve(config, "alice", "auto"))["llm_gateway"]
    assert auto["routing"] == {"type": "complexity", "strong": "claude", "weak": "gpt-4o-mini", "threshold": 0.4}
    assert auto["strategy"] is None
    assert [(d["route"], d["model"]) for d in auto["deployments"]] == [("strong", "claude-haiku-4-5"),
                                                                       ("weak", "gpt-4o-mini")]
    assert auto["context_window"] == 128000  # gpt-4o-mini's, the smaller of the two


async def test_model_access_filters_the_list_and_hides_names(config: Any) -> None:
    bob = await listing(config, "bob")
    assert [m["id"] for m in bob["data"]] == ["gpt-4o-mini", "claude", "auto"]
    claude = next(m for m in bob["data"] if m["id"] == "claude")["llm_gateway"]
    assert claude["fallbacks"] == ["gpt-4o-mini"]
    assert claude["context_window_fallbacks"] == []  # 'secret-big' is not bob's to know of
    assert "secret-big" not in json.dumps(bob)
    for hidden in ("mixed", "secret-big", "no-such-alias"):
        with pytest.raises(GatewayError) as caught:
            await retrieve(config, "bob", hidden)
        assert caught.value.status == 404 and caught.value.code == "model_not_found"
        assert caught.value.json() == models.not_found(hidden).json()  # may not use == does not exist
    alice = await retrieve(config, "alice", "claude")
    assert alice["llm_gateway"]["context_window_fallbacks"] == ["secret-big"]


async def test_no_secret_in_any_answer(config: Any) -> None:
    bodies = [json.dumps(await listing(config, who)) for who in ("alice", "bob")]
    bodies += [json.dumps(await retrieve(config, "alice", name)) for name in config.models]
    for body in bodies:
        assert SECRET not in body and PASSWORD not in body and "llm.internal" not in body
        assert "api_key" not in body and "api_base" not in body and "#0" not in body


async def test_computed_once_per_config_not_per_request(config: Any) -> None:
    await listing(config, "alice")
    builds, lookups = models.BUILDS, model_info.LOOKUPS
    for _ in range(50):
        await listing(config, "alice")
        await listing(config, "bob")
        await retrieve(config, "bob", "auto")
    assert models.BUILDS == builds and model_info.LOOKUPS == lookups, "model information recomputed per request"
    # a config with other content is another catalog; an equal one (same key) held by the registry is the same
    other = parse_config({**RAW, "max_body_bytes": 1000}, env={})
    await listing(other, "alice")
    assert models.BUILDS == builds + 1


async def test_concurrent_first_requests_share_one_build(config: Any) -> None:
    builds = models.BUILDS
    answers = await asyncio.gather(*(models.ENDPOINT.answer(admitted(config, "alice")) for _ in range(20)))
    assert models.BUILDS == builds + 1 and len(set(answers)) == 1


async def test_per_request_cost_is_a_lookup(config: Any) -> None:
    """The numbers the report quotes: per-request cost with and without model_access."""
    open_config = parse_config({k: v for k, v in RAW.items() if k != "model_access"}, env={})
    timings = {}
    for label, cfg, who in (("no model_access", open_config, "alice"), ("model_access", config, "bob")):
        request = admitted(cfg, who)
        await models.ENDPOINT.answer(request)
        started = time.perf_counter()
        for _ in range(2000):
            await models.ENDPOINT.answer(request)
        timings[label] = (time.perf_counter() - started) / 2000
    print({k: f"{v * 1e6:.1f} µs" for k, v in timings.items()})
    assert all(v < 200e-6 for v in timings.values()), timings


async def test_a_released_config_takes_its_catalog_along() -> None:
    import gc

    config = parse_config({**RAW, "max_body_bytes": 12345}, env={})
    await listing(config, "alice")
    key = config.key
    assert key in models._catalogs
    del config
    gc.collect()
    assert key not in models._catalogs


# -- end to end: the OpenAI SDK → the harness → the real plugin server --------------------------------------

def access_config(mock: Any) -> dict[str, Any]:
    """A route of its own: bob may use only some aliases; one alias holds a slash, one routes by complexity."""
    oa = mock.openai_base
    return {
        "models": [
            {"name": "gpt-4o-mini", "deployments": [{"model": "openai/gpt-4o-mini", "api_base": oa,
                                                     "api_key_env": "MOCK_PROVIDER_KEY"}]},
            {"name": "openai/gpt-4o", "deployments": [{"model": "openai/gpt-4o", "api_base": oa,
                                                       "api_key_env": "MOCK_PROVIDER_KEY"}]},
            {"name": "demo", "deployments": [{"model": "demo/echo"}]},
            {"name": "staff-only", "deployments": [{"model": "openai/mock-gpt", "api_base": oa,
                                                    "api_key_env": "MOCK_PROVIDER_KEY"}]},
            {"name": "auto", "route_by_complexity": {"strong": "openai/gpt-4o", "weak": "gpt-4o-mini"}},
        ],
        "model_access": [{"consumers": ["bob"], "models": ["demo", "auto", "gpt-4o-mini"]}],
    }


@pytest.fixture(scope="module")
def access_route(plugin_server: Any, mock_provider: Any) -> Iterator[Any]:
    with route_to(plugin_server, access_config(mock_provider)) as harness:
        yield harness


def sdk(route: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{route.url}/v1", api_key="unused-by-key-auth", max_retries=0,
                         default_headers={"apikey": key})


def test_sdk_lists_the_routes_aliases(client: openai.OpenAI, mock_provider: Any) -> None:
    raw = client.models.with_raw_response.list()
    body = json.loads(raw.text)
    assert_valid("ListModelsResponse", body)
    expected = [a["name"] for a in gateway_config(mock_provider)["models"]]
    assert [m.id for m in raw.parse()] == expected
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.headers["X-Request-ID"] == raw.headers["X-Kong-Request-Id"]
    assert PROVIDER_KEY not in raw.text and WRONG_PROVIDER_KEY not in raw.text
    assert mock_provider.base_url not in raw.text and "127.0.0.1" not in raw.text  # no api_base either


def test_sdk_retrieves_one_alias_with_its_deployments(client: openai.OpenAI) -> None:
    demo = client.models.retrieve("demo")
    assert (demo.id, demo.object, demo.created, demo.owned_by) == ("demo", "model", 0, "demo")
    extension = demo.model_extra["llm_gateway"]
    assert extension["deployments"][0]["provider"] == "demo"
    priced = client.models.retrieve("priced-gpt").model_extra["llm_gateway"]["deployments"][0]
    assert (priced["input_cost_per_token"], priced["output_cost_per_token"]) == (PRICE["input_cost_per_token"],
                                                                               PRICE["output_cost_per_token"])
    catalog = client.models.retrieve("gpt-4o-mini").model_extra["llm_gateway"]
    assert catalog["context_window"] == 128000 and catalog["supports"]["tools"] is True
    unknown = client.models.retrieve("gpt-mock").model_extra["llm_gateway"]
    assert unknown["context_window"] is None and unknown["deployments"][0]["mode"] is None


def test_unknown_id_is_openais_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.body == {"message": "The model 'no-such-model' does not exist on this route.",
                                 "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_model_access_bob_sees_his_aliases_only(access_route: Any) -> None:
    alice, bob = sdk(access_route, ALICE_KEY), sdk(access_route, BOB_KEY)
    assert [m.id for m in alice.models.list()] == ["gpt-4o-mini", "openai/gpt-4o", "demo", "staff-only", "auto"]
    assert [m.id for m in bob.models.list()] == ["gpt-4o-mini", "demo", "auto"]
    assert alice.models.retrieve("staff-only").id == "staff-only"
    answers = []
    for hidden in ("staff-only", "no-such-alias"):
        with pytest.raises(openai.NotFoundError) as caught:
            bob.models.retrieve(hidden)
        answers.append(caught.value.body["message"].replace(hidden, "X"))
        assert caught.value.body["code"] == "model_not_found"
    assert answers[0] == answers[1], "a model bob may not use looks exactly like one that does not exist"


def test_routing_alias_and_slashed_ids(access_route: Any) -> None:
    alice, bob = sdk(access_route, ALICE_KEY), sdk(access_route, BOB_KEY)
    slashed = alice.models.retrieve("openai/gpt-4o")  # the SDK sends it as openai%2Fgpt-4o
    assert slashed.id == "openai/gpt-4o" and slashed.owned_by == "openai"
    auto = alice.models.retrieve("auto").model_extra["llm_gateway"]
    assert auto["routing"]["type"] == "complexity"
    assert (auto["routing"]["strong"], auto["routing"]["weak"]) == ("openai/gpt-4o", "gpt-4o-mini")
    assert [d["route"] for d in auto["deployments"]] == ["strong", "weak"]
    hidden = bob.models.retrieve("auto").model_extra["llm_gateway"]["routing"]
    assert (hidden["strong"], hidden["weak"]) == (None, "gpt-4o-mini")  # bob may not use openai/gpt-4o


def test_described_once_per_config_on_the_server(plugin_server: Any, access_route: Any) -> None:
    """The server logs one line per config it describes: many requests, one description."""
    bob = sdk(access_route, BOB_KEY)
    for _ in range(10):
        bob.models.list()
        bob.models.retrieve("demo")
    lines = [line for line in plugin_server.stderr_text().splitlines() if "model list of config" in line]
    keys = [line.split("model list of config ")[1].split(":")[0] for line in lines]
    assert keys and len(keys) == len(set(keys)), lines


def test_gets_are_not_charged(plugin_server: Any, client: openai.OpenAI) -> None:
    raw = client.models.with_raw_response.retrieve("demo")
    assert raw.headers["X-Request-ID"] not in usage_records(plugin_server)
    assert "X-LLM-Provider" not in raw.headers
