"""Shared fixtures: a real mock provider, a real plugin server, and the Kong-side harness in front of it."""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Plugin servers the tests start run one process unless a test asks for more: a test that posts a minted ticket
# to server.listen then meets the process it names, one that kills "the" plugin server kills all of it, and the
# shared cores warm one server up, not N. LLM_GATEWAY_TEST_PROCESSES=N runs them on N; tests/kong/test_processes.py
# starts several processes on servers of its own, and real Kong's plugin server runs the default (one per core).
os.environ.setdefault("LLM_GATEWAY_PROCESSES", os.environ.get("LLM_GATEWAY_TEST_PROCESSES", "1"))

from kong_harness import KongHarness, PluginServerProcess, start_plugin_server
from mock_provider import MockProvider

# generated per run, so a leak check can search every response and log for them
PROVIDER_KEY = "mock-provider-key-" + secrets.token_hex(12)
WRONG_PROVIDER_KEY = "wrong-provider-key-" + secrets.token_hex(12)
ALICE_KEY = "test-key-alice-" + secrets.token_hex(6)
BOB_KEY = "test-key-bob-" + secrets.token_hex(6)
CONSUMERS = {
    ALICE_KEY: {"id": "8f3a6c1e-8d2b-4b7e-9a57-1c0d9e2f4a11", "username": "alice", "custom_id": None},
    BOB_KEY: {"id": "2b9d7e44-1a6f-4c3d-8e21-7f5a0b6c9d22", "username": "bob", "custom_id": "team-b"},
}
TICKET_TTL = 3.0
MAX_BODY_BYTES = 64 * 1024
RUN_ID = secrets.token_hex(4)
REDIS_URL = "redis://127.0.0.1:6379/15"  # tests only touch keys under their run's prefix
REDIS_PREFIX = f"llmgw-test-{RUN_ID}:"
USAGE_STREAM = f"{REDIS_PREFIX}usage"
PRICE = {"input_cost_per_token": 1e-6, "output_cost_per_token": 4e-6, "cache_read_input_token_cost": 2.5e-7}
BOB_BUDGET_TOKENS = 400


class RedisNodes:
    """Redis clients for one test, each playing a Kong node of its own, all on the test's own key prefix;
    ``close`` drops the test's keys."""

    def __init__(self, name: str) -> None:
        self.prefix = f"llmgw-test-{name}-{secrets.token_hex(4)}:"
        self.clients: list[Any] = []

    def client(self) -> Any:
        import redis.asyncio as aioredis

        self.clients.append(aioredis.from_url(REDIS_URL))
        return self.clients[-1]

    async def close(self) -> None:
        if self.clients:
            keys = [k async for k in self.clients[0].scan_iter(match=f"{self.prefix}*")]
            if keys:
                await self.clients[0].delete(*keys)
        for client in self.clients:
            await client.aclose()


@pytest.fixture
async def redis_nodes(request: pytest.FixtureRequest) -> AsyncIterator[RedisNodes]:
    nodes = RedisNodes(request.module.__name__.removeprefix("test_").replace("_", "-"))
    yield nodes
    await nodes.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mock_alias(name: str, model: str, api_base: str, **extra: Any) -> dict[str, Any]:
    """An alias with one deployment at the mock provider, with the mock's key."""
    deployment = {"model": model, "api_base": api_base, "api_key_env": "MOCK_PROVIDER_KEY", **extra}
    return {"name": name, "deployments": [deployment]}


def gateway_config(mock: MockProvider) -> dict[str, Any]:
    """The route's plugin config in the tests: one alias per provider behaviour under test."""
    oa, an = mock.openai_base, mock.anthropic_base
    return {
        "max_body_bytes": MAX_BODY_BYTES,
        "redis": {"url": REDIS_URL, "key_prefix": REDIS_PREFIX, "usage_stream": USAGE_STREAM},
        # quick retries, so the error tests do not wait on backoff
        "routing": {"backoff_initial": 0.01, "backoff_max": 0.5},
        "budgets": [{"name": "bob-hourly", "window": "hour", "tokens": BOB_BUDGET_TOKENS, "consumers": ["bob"]}],
        "models": [
            mock_alias("priced-gpt", "openai/mock-gpt-cached-3-reasoning-2", oa, price=PRICE),
            mock_alias("priced-claude", "anthropic/mock-claude-cached-4", an, price=PRICE),
            mock_alias("drip", "openai/mock-gpt-drip-50-words-40", oa),
            mock_alias("gpt-mock", "openai/mock-gpt", oa),
            mock_alias("gpt-4o-mini", "openai/gpt-4o-mini", oa),  # a catalog model: LiteLLM forwards `user` for it
            mock_alias("o3-mini", "openai/o3-mini", oa),  # a reasoning model: reasoning_effort applies
            mock_alias("gpt-tools", "openai/mock-gpt-tool", oa),
            mock_alias("claude-mock", "anthropic/mock-claude", an),
            mock_alias("claude-tools", "anthropic/mock-claude-tool", an),
            {"name": "demo", "deployments": [{"model": "demo/echo"}]},
            mock_alias("slow-300", "openai/mock-slow-300", oa),
            mock_alias("rate-limited", "openai/mock-err-429-ra-7", oa),
            mock_alias("provider-500", "openai/mock-err-500", oa),
            mock_alias("provider-503", "openai/mock-err-503", oa),
            mock_alias("provider-400", "openai/mock-err-400", oa),
            {"name": "wrong-key", "deployments": [
                {"model": "openai/mock-gpt", "api_base": oa, "api_key_env": "WRONG_PROVIDER_KEY"}]},
            {"name": "provider-down", "deployments": [
                {"model": "openai/mock-gpt", "api_base": f"http://127.0.0.1:{free_port()}/v1",
                 "api_key_env": "MOCK_PROVIDER_KEY"}]},
            mock_alias("too-slow", "openai/mock-slow-3000", oa, timeout=0.5),
            mock_alias("cut-stream", "openai/mock-cut-3", oa),
            mock_alias("cut-before-first", "openai/mock-cut-0", oa),
            mock_alias("malformed", "openai/mock-malformed", oa),
            mock_alias("claude-cut", "anthropic/mock-claude-cut-3", an),
            # /v1/messages (tests/api/test_messages.py): thinking, cache writes and count_tokens on the mock's
            # Anthropic extras (tests/mock_anthropic_extras.py), a retry and a fallback across providers
            mock_alias("claude-think", "anthropic/mock-claude-think", mock.base_url + "/extras"),
            mock_alias("claude-cache", "anthropic/mock-claude-cached-2-cwrite-3", mock.base_url + "/extras",
                       price={**PRICE, "cache_creation_input_token_cost": 1.25e-6}),
            mock_alias("claude-errmid", "anthropic/mock-claude-errmid", mock.base_url + "/extras"),
            {"name": "claude-retried", "strategy": "priority", "deployments": [
                {"model": "anthropic/mock-claude-err-500", "api_base": an, "api_key_env": "MOCK_PROVIDER_KEY"},
                {"model": "openai/mock-gpt-second", "api_base": oa, "api_key_env": "MOCK_PROVIDER_KEY"}]},
            {**mock_alias("claude-falls-back", "anthropic/mock-claude-err-529", an), "fallbacks": ["claude-mock"]},
            # /v1/embeddings (api/embeddings.py; LiteLLM's Cohere config posts to api_base as the whole URL)
            mock_alias("embed-mock", "openai/mock-embed", oa),
            mock_alias("embed-3-small", "openai/text-embedding-3-small", oa),  # priced by LiteLLM's map
            mock_alias("embed-ada", "openai/text-embedding-ada-002", oa),  # LiteLLM: no dimensions on ada
            mock_alias("embed-no-usage", "openai/mock-embed-nousage", oa),
            mock_alias("embed-cohere", "cohere/embed-english-v3.0", f"{mock.base_url}/v2/embed"),
            mock_alias("embed-cohere-v4", "cohere/embed-v4.0", f"{mock.base_url}/v2/embed"),
            {**mock_alias("embed-cohere-lenient", "cohere/embed-english-v3.0", f"{mock.base_url}/v2/embed"),
             "drop_params": True},
            {"name": "embed-retried", "strategy": "priority", "deployments": [
                {"model": "cohere/mock-embed-retried-err-500-v3", "api_base": f"{mock.base_url}/v2/embed",
                 "api_key_env": "MOCK_PROVIDER_KEY"},
                {"model": "openai/mock-embed-second", "api_base": oa, "api_key_env": "MOCK_PROVIDER_KEY"}]},
            {**mock_alias("embed-fallback", "cohere/mock-embed-fallback-err-503-v3", f"{mock.base_url}/v2/embed"),
             "fallbacks": ["embed-mock"]},
            mock_alias("embed-400", "openai/mock-embed-err-400", oa),
            mock_alias("embed-cohere-400", "cohere/mock-embed-err-400-v3", f"{mock.base_url}/v2/embed"),
        ],
    }


@pytest.fixture(scope="session")
def mock_provider() -> Iterator[MockProvider]:
    with MockProvider(required_key=PROVIDER_KEY) as mock:
        yield mock


@pytest.fixture(scope="session")
def plugin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginServerProcess]:
    socket_path = str(tmp_path_factory.mktemp("kong-prefix") / "llm-gateway.sock")
    metrics = f"127.0.0.1:{free_port()}"
    server = start_plugin_server(
        socket_path, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
        env={"MOCK_PROVIDER_KEY": PROVIDER_KEY, "WRONG_PROVIDER_KEY": WRONG_PROVIDER_KEY,
             "LLM_GATEWAY_TICKET_TTL": str(TICKET_TTL), "LLM_GATEWAY_METRICS_LISTEN": metrics},
    )
    server.metrics = metrics  # type: ignore[attr-defined]
    yield server
    server.stop()


def route_to(server: PluginServerProcess, config: dict[str, Any]) -> KongHarness:
    """A Kong route (with the test consumers) whose llm-gateway plugin has ``config``, on ``server``."""
    return KongHarness(server.socket_path, config, CONSUMERS, service_url=f"http://{server.listen}")


@pytest.fixture(scope="session")
def kong(plugin_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    with route_to(plugin_server, gateway_config(mock_provider)) as harness:
        yield harness


def usage_records(server: PluginServerProcess) -> dict[str, dict[str, Any]]:
    """The usage records the plugin server logged (one JSON log line each, ``"event": "usage"``), by request id."""
    records = {}
    for line in server.log_lines():
        start = line.find('{"ts":')  # Kong prefixes the lines it copies into its error log
        if start < 0 or '"event":"usage"' not in line:
            continue
        entry = json.loads(line[start:])
        if entry.get("event") == "usage":
            records[entry["request_id"]] = entry
    return records


def wait_for_record(server: PluginServerProcess, request_id: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record := usage_records(server).get(request_id):
            return record
        time.sleep(0.05)
    raise AssertionError(f"no usage record for request {request_id}")


def wait_for_log(server: PluginServerProcess, text: str, timeout: float = 10) -> list[str]:
    """The server's log lines once one contains ``text``: lines are written by a thread of their own
    (operations/logs.py), a moment after the answer that caused them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = server.log_lines()
        if any(text in line for line in lines):
            return lines
        time.sleep(0.02)
    raise AssertionError(f"no log line containing {text!r}")


@pytest.fixture
def client(kong: KongHarness) -> openai.OpenAI:
    """The OpenAI Python SDK, pointed at "Kong", authenticated with key-auth's apikey header."""
    return openai.OpenAI(base_url=f"{kong.url}/v1", api_key="unused-by-key-auth", max_retries=0,
                         default_headers={"apikey": ALICE_KEY})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The secret scan runs last, so it reads the logs, metrics and records of the whole run."""
    items.sort(key=lambda item: item.module.__name__ == "test_secrets" if item.module else False)
