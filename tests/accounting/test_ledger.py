"""The ledger on its own: what it charges for answers that reported no usage, whatever their endpoint."""

from __future__ import annotations

import asyncio
import json
import time

import pytest


@pytest.mark.parametrize("answered", [True, False])
async def test_a_json_answer_without_usage_or_text_is_charged_its_prompt(
        answered: bool, caplog: pytest.LogCaptureFixture) -> None:
    """An embedding answer carries no completion text: when its provider reports no usage, the prompt is still
    charged (estimated), because the provider answered; a request that never got an answer is charged nothing."""
    from llm_gateway.accounting.ledger import Ledger
    from llm_gateway.api.embeddings import parse_embedding_request
    from llm_gateway.config import ConfigRegistry, parse_config
    from llm_gateway.kong.ticket import TicketBook
    from llm_gateway.providers.upstream import target_of
    from llm_gateway.runtime import Runtime

    config = parse_config({"models": [{"name": "e", "deployments": [{"model": "openai/text-embedding-3-small"}]}]})
    runtime = Runtime(registry=ConfigRegistry(), tickets=TicketBook(ttl_seconds=5))
    deployment = config.models["e"].deployments[0]
    request = parse_embedding_request(json.dumps({"model": "e", "input": ["one two three", "four"]}).encode())
    ledger = Ledger(runtime, config, request_id=f"req-{answered}", consumer="alice", consumer_id=None,
                    request=request, deployment=deployment, target=target_of(deployment), started=time.monotonic())
    await ledger.admit()
    ledger.answered = answered
    with caplog.at_level("INFO", logger="llm_gateway.usage"):
        await ledger.finish(200 if answered else 502)
    record = next(json.loads(r.getMessage()) for r in caplog.records if r.name == "llm_gateway.usage")
    assert record["endpoint"] == "embeddings"
    if answered:
        assert record["prompt_tokens"] > 0 and record["completion_tokens"] == 0 and record["estimated"] is True
        assert record["cost_usd"] > 0
    else:
        assert record["total_tokens"] == 0 and record["cost_usd"] is None
    await runtime.close()
    await asyncio.sleep(0)
