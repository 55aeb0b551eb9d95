"""Budgets shared through Redis by two plugin-server processes (two Kong nodes): 200 concurrent requests from
one consumer never get more admitted than the limit plus one request's reservation, the settled total equals
the usage actually reported, and the counters survive a plugin-server restart.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import PROVIDER_KEY, REDIS_URL, free_port
from kong_harness import KongHarness, PluginServerProcess, start_plugin_server
from llm_gateway.accounting.budget_stores.redis import RedisBudgetStore
from llm_gateway.accounting.budgets import Budget
from mock_provider import MockProvider

CAROL_KEY = "test-key-carol-" + secrets.token_hex(6)
CAROL = {"id": "5d6e7f80-9a1b-4c2d-8e3f-4a5b6c7d8e9f", "username": "carol"}
LIMIT = 600
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory,
              mock_provider: MockProvider) -> Iterator[tuple[list[PluginServerProcess], list[KongHarness], dict]]:
    prefix = f"llmgw-test-shared-{secrets.token_hex(4)}:"
    config = {
        "redis": {"url": REDIS_URL, "key_prefix": prefix, "usage_stream": f"{prefix}usage"},
        "budgets": [{"name": "carol-daily", "window": "day", "tokens": LIMIT}],
        "models": [{"name": "small", "deployments": [
            {"model": "openai/mock-gpt-words-5", "api_base": mock_provider.openai_base,
             "api_key_env": "MOCK_PROVIDER_KEY"}]}],
    }
    servers, harnesses = [], []
    for node in ("a", "b"):
        socket_path = str(tmp_path_factory.mktemp(f"node-{node}") / "llm-gateway.sock")
        servers.append(start_plugin_server(socket_path, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                           env={"MOCK_PROVIDER_KEY": PROVIDER_KEY,
                                                "LLM_GATEWAY_METRICS_LISTEN": "off"}))
        harnesses.append(KongHarness(socket_path, config, {CAROL_KEY: CAROL},
                                     service_url=f"http://{servers[-1].listen}").start())
    yield servers, harnesses, dict(config, prefix=prefix)
    for harness in harnesses:
        harness.stop()
    for server in servers:
        server.stop()


async def _burst(urls: list[str], n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one(i: int) -> httpx.Response:
            return await client.post(f"{urls[i % len(urls)]}/v1/chat/completions", headers={"apikey": CAROL_KEY},
                                     json={"model": "small", "max_tokens": MAX_TOKENS,
                                           "messages": [{"role": "user", "content": f"hi {i}"}]})
        return await asyncio.gather(*(one(i) for i in range(n)))


async def _used(prefix: str) -> tuple[int, float]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    store = RedisBudgetStore(client, key_prefix=f"{prefix}budget:")
    try:
        return await store.usage("carol", Budget(name="carol-daily", window="day", tokens=LIMIT, usd=None))
    finally:
        await store.close()
        await client.aclose()


def test_two_nodes_share_one_budget(two_nodes: tuple, tmp_path_factory: pytest.TempPathFactory) -> None:
    servers, harnesses, config = two_nodes
    responses = asyncio.run(_burst([h.url for h in harnesses], 200))
    admitted = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 429]
    assert len(admitted) + len(rejected) == 200, {r.status_code for r in responses}
    assert admitted and rejected, "the limit should both admit and refuse part of the burst"
    assert all(r.json()["error"]["code"] == "budget_exceeded" for r in rejected)
    actual = sum(int(r.headers["X-LLM-Total-Tokens"]) for r in admitted)
    one_reservation = MAX_TOKENS + 50  # max_tokens plus a generous bound on the prompt estimate of "hi N"
    assert actual <= LIMIT + one_reservation
    used_tokens, _ = asyncio.run(_used(config["prefix"]))
    assert used_tokens == actual, "settled totals must equal the usage the provider reported"

    # a plugin-server restart (node a) forgets nothing: Redis holds the counters
    servers[0].stop()
    harnesses[0].stop()
    socket_path = str(Path(servers[0].socket_path))
    restarted = start_plugin_server(socket_path, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                    env={"MOCK_PROVIDER_KEY": PROVIDER_KEY, "LLM_GATEWAY_METRICS_LISTEN": "off"})
    servers[0] = restarted
    config_only = {k: v for k, v in config.items() if k != "prefix"}
    harnesses[0] = KongHarness(socket_path, config_only, {CAROL_KEY: CAROL},
                               service_url=f"http://{restarted.listen}").start()
    assert asyncio.run(_used(config["prefix"]))[0] == actual
    again = httpx.post(f"{harnesses[0].url}/v1/chat/completions", headers={"apikey": CAROL_KEY}, timeout=30,
                       json={"model": "small", "max_tokens": LIMIT, "messages": [{"role": "user", "content": "hi"}]})
    # it enforces them: refused, or (a reservation is capped to what the budget has left) granted only the rest
    assert again.status_code in (200, 429), again.text
    if again.status_code == 200:
        assert int(again.headers["X-LLM-Max-Tokens-Capped"]) <= LIMIT - actual
