"""Complexity routing reads every endpoint's request, not only chat's: a hard prompt sent as Anthropic Messages,
a Responses API input or a legacy prompt goes to the routing alias's strong alias, an easy one to the weak."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import ALICE_KEY, route_to
from kong_harness import KongHarness, PluginServerProcess

HARD = ("Prove step by step that this algorithm is correct, analyze its complexity and compare the trade-offs "
        "with a heap-based design:\n```python\ndef merge(a, b):\n    out = []\n    while a and b:\n"
        "        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n    return out + a + b\n```\n") * 6
EASY = "hi"


def bodies(text: str) -> dict[str, dict[str, Any]]:
    turns = [{"role": "user", "content": "I need help with a proof."},
             {"role": "assistant", "content": "Sure, send it."}, {"role": "user", "content": text}]
    return {"/v1/chat/completions": {"messages": turns},
            "/v1/messages": {"max_tokens": 32, "messages": turns},
            "/v1/responses": {"input": turns},
            "/v1/completions": {"prompt": text}}


@pytest.fixture(scope="module")
def route(plugin_server: PluginServerProcess) -> Iterator[KongHarness]:
    config = {"models": [{"name": "strong", "deployments": [{"model": "demo/strong"}]},
                         {"name": "weak", "deployments": [{"model": "demo/weak"}]},
                         {"name": "auto", "route_by_complexity": {"strong": "strong", "weak": "weak",
                                                                  "threshold": 0.4}}]}
    with route_to(plugin_server, config) as harness:
        yield harness


@pytest.mark.parametrize("path", list(bodies(EASY)))
def test_a_hard_prompt_goes_strong_and_an_easy_one_weak_on_every_endpoint(route: KongHarness, path: str) -> None:
    with httpx.Client(timeout=30) as http:
        for text, tier in ((HARD, "strong"), (EASY, "weak")):
            response = http.post(f"{route.url}{path}", json={"model": "auto", **bodies(text)[path]},
                                 headers={"x-api-key": ALICE_KEY})
            assert response.status_code == 200, response.text
            assert response.headers["X-LLM-Complexity"].endswith(f"routed={tier}"), response.headers
            assert response.headers["X-LLM-Model"] == tier


def test_embeddings_on_a_routing_alias_go_weak(route: KongHarness) -> None:
    response = httpx.post(f"{route.url}/v1/embeddings", json={"model": "auto", "input": HARD},
                          headers={"x-api-key": ALICE_KEY}, timeout=30)
    assert response.status_code == 200 and response.headers["X-LLM-Complexity"].endswith("routed=weak")
