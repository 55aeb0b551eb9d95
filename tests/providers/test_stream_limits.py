"""Issue 10 item 4 end to end: what one request may spend and how long a stream may last. A budgeted
request without max_tokens is sent upstream with max_tokens capped to its reservation (and told so); a
provider that ignores it is cut when the reservation is used up; streams end at the route's maximum duration
and idle time (SSE comments do not count as activity); each cut is an SSE error event, recorded truncated.
Plus item 3's accounting side: the ledger's finish never raises and always writes the record."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import PROVIDER_KEY, REDIS_URL, free_port, wait_for_record
from hostile_provider import HostileProvider
from kong_harness import KongHarness, PluginServerProcess, start_plugin_server
from llm_gateway.providers.stream_limits import SLACK_TOKENS

DAVE_KEY = "test-key-dave-" + secrets.token_hex(6)
ERIN_KEY = "test-key-erin-" + secrets.token_hex(6)
CONSUMERS = {DAVE_KEY: {"id": "0d5e6f70-1a2b-4c3d-9e8f-7a6b5c4d3e21", "username": "dave"},
             ERIN_KEY: {"id": "1e2f3a4b-5c6d-4e7f-8a9b-0c1d2e3f4a5b", "username": "erin"}}
BUDGET = 2000
RESERVATION = 50
MAX_DURATION = 3.0
IDLE = 1.0


@pytest.fixture(scope="module")
def hostile() -> HostileProvider:
    return HostileProvider().start()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory,
            hostile: HostileProvider) -> Iterator[tuple[PluginServerProcess, KongHarness]]:
    prefix = f"llmgw-test-limits-{secrets.token_hex(4)}:"
    config = {
        "redis": {"url": REDIS_URL, "key_prefix": prefix, "usage_stream": f"{prefix}usage"},
        "budgets": [{"name": "dave-hourly", "window": "hour", "tokens": BUDGET, "consumers": ["dave"]}],
        "budget_reservation_tokens": RESERVATION,
        "limits": {"stream_max_duration": MAX_DURATION, "stream_idle_timeout": IDLE},
        "models": [{"name": name, "deployments": [{"model": f"openai/{name}", "api_base": hostile.base,
                                                     "api_key_env": "MOCK_PROVIDER_KEY"}]}
                   for name in ("endless", "comments", "short")],
    }
    socket_path = str(tmp_path_factory.mktemp("limits") / "llm-gateway.sock")
    server = start_plugin_server(socket_path, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                 env={"MOCK_PROVIDER_KEY": PROVIDER_KEY, "LLM_GATEWAY_METRICS_LISTEN": "off"})
    harness = KongHarness(socket_path, config, CONSUMERS, service_url=f"http://{server.listen}").start()
    yield server, harness
    harness.stop()
    server.stop()


def _stream(url: str, key: str, model: str, **extra: object) -> tuple[httpx.Headers, list[str], float]:
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"apikey": key}, timeout=30,
                      json={"model": model, "stream": True, "messages": [{"role": "user", "content": "go on"}],
                            **extra}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        return response.headers, lines, time.monotonic() - started


def _error_event(lines: list[str]) -> dict:
    assert lines and "data: [DONE]" not in lines, "a stream the gateway ended has no [DONE]"
    return json.loads(lines[-1][6:])["error"]


def test_a_budgeted_stream_is_capped_to_its_reservation_and_cut_when_the_provider_ignores_it(
        gateway: tuple[PluginServerProcess, KongHarness], hostile: HostileProvider) -> None:
    server, harness = gateway
    headers, lines, elapsed = _stream(harness.url, DAVE_KEY, "endless")
    assert headers["X-LLM-Max-Tokens-Capped"] == str(RESERVATION)
    assert hostile.bodies[-1]["max_tokens"] == RESERVATION, "the provider was told the reservation's limit"
    error = _error_event(lines)
    assert error["code"] == "budget_reservation_exhausted"
    record = wait_for_record(server, headers["X-Request-ID"])
    assert record["truncated"] is True and record["estimated"] is True
    ceiling = RESERVATION + max(SLACK_TOKENS, RESERVATION // 4)  # the estimate's tolerance (stream_limits.py)
    assert RESERVATION < record["completion_tokens"] <= ceiling + 10, "cut just past the reservation, not 316x it"
    assert elapsed < MAX_DURATION, "the reservation ended it, not the duration limit"


def test_a_client_max_tokens_above_what_the_budget_has_left_is_lowered(
        gateway: tuple[PluginServerProcess, KongHarness], hostile: HostileProvider) -> None:
    _, harness = gateway
    headers, _, _ = _stream(harness.url, DAVE_KEY, "short", max_tokens=100_000)
    capped = int(headers["X-LLM-Max-Tokens-Capped"])
    assert capped < BUDGET and hostile.bodies[-1]["max_tokens"] == capped
    headers, _, _ = _stream(harness.url, DAVE_KEY, "short", max_tokens=20)
    assert "X-LLM-Max-Tokens-Capped" not in headers and hostile.bodies[-1]["max_tokens"] == 20


def test_a_stream_that_never_ends_is_ended_at_the_maximum_duration(
        gateway: tuple[PluginServerProcess, KongHarness]) -> None:
    server, harness = gateway
    headers, lines, elapsed = _stream(harness.url, ERIN_KEY, "endless")  # no budget: only the duration bounds it
    assert _error_event(lines)["code"] == "stream_max_duration"
    assert MAX_DURATION - 0.5 <= elapsed < MAX_DURATION + 2
    record = wait_for_record(server, headers["X-Request-ID"])
    assert record["truncated"] is True and record["status"] == 504 and record["error_code"] == "stream_max_duration"
    assert record["completion_tokens"] > 100, "what was streamed is accounted"


def test_comments_do_not_keep_a_silent_stream_alive(gateway: tuple[PluginServerProcess, KongHarness]) -> None:
    server, harness = gateway
    headers, lines, elapsed = _stream(harness.url, ERIN_KEY, "comments")
    assert _error_event(lines)["code"] == "stream_idle_timeout"
    assert IDLE <= elapsed < MAX_DURATION
    record = wait_for_record(server, headers["X-Request-ID"])
    assert record["truncated"] is True and record["error_code"] == "stream_idle_timeout"


def test_the_text_kept_for_estimating_usage_is_bounded() -> None:
    from llm_gateway.providers.openai_compatible import TEXT_KEPT_CHARS, Usage

    usage = Usage()
    for _ in range(100_000):
        usage.take_text([{"delta": {"content": "word " * 20}}])
    assert usage.chars == 10_000_000 and usage.kept == TEXT_KEPT_CHARS
    assert sum(map(len, usage.text)) == TEXT_KEPT_CHARS and len(usage.text) < 600


async def test_finish_never_raises_and_always_records(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:

    from llm_gateway.accounting.ledger import Ledger
    from llm_gateway.api.chat_completions import ChatRequest
    from llm_gateway.config import ConfigRegistry, parse_config
    from llm_gateway.kong.ticket import TicketBook
    from llm_gateway.providers.upstream import target_of
    from llm_gateway.runtime import Runtime

    config = parse_config({"models": [{"name": "m", "deployments": [{"model": "openai/gpt-4o-mini"}]}]})
    runtime = Runtime(registry=ConfigRegistry(), tickets=TicketBook(ttl_seconds=5))
    deployment = config.models["m"].deployments[0]
    odd = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": 1}]
    for broken in (False, True):
        chat = ChatRequest(model="m", stream=True, include_usage=False, params={"messages": odd})
        ledger = Ledger(runtime, config, request_id=f"req-{broken}", consumer="alice", consumer_id=None, request=chat,
                        deployment=deployment, target=target_of(deployment), started=time.monotonic())
        await ledger.admit()
        ledger.first_byte = time.monotonic()
        ledger.usage.take_text([{"delta": {"content": "cut off after a few words"}}])  # no usage: estimated
        if broken:
            def boom(*_: object) -> int:
                raise RuntimeError("estimator bug")
            monkeypatch.setattr("llm_gateway.accounting.ledger.estimate_completion_tokens", boom)
        with caplog.at_level("INFO", logger="llm_gateway.usage"):
            await ledger.finish(502, error_code="provider_error", truncated=True)
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llm_gateway.usage"]
        record = next(line for line in lines if line["request_id"] == f"req-{broken}")
        assert record["status"] == 502 and record["truncated"] is True
        assert (record["total_tokens"] > 0) is (not broken), "counted when it can be, recorded even when not"
    await runtime.close()
    await asyncio.sleep(0)


async def test_finish_completes_when_the_request_is_cancelled_mid_settlement(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A client that leaves while the reservation is being settled is still billed and recorded."""
    from llm_gateway.accounting.budget_stores.memory import MemoryBudgetStore
    from llm_gateway.accounting.ledger import Ledger
    from llm_gateway.api.chat_completions import ChatRequest
    from llm_gateway.config import ConfigRegistry, parse_config
    from llm_gateway.kong.ticket import TicketBook
    from llm_gateway.providers.upstream import target_of
    from llm_gateway.runtime import Runtime

    config = parse_config({"models": [{"name": "m", "deployments": [{"model": "openai/gpt-4o-mini"}]}],
                           "budgets": [{"name": "d", "window": "day", "tokens": 10_000}]})
    runtime = Runtime(registry=ConfigRegistry(), tickets=TicketBook(ttl_seconds=5))
    store = runtime.budget_store(config)
    assert isinstance(store, MemoryBudgetStore)
    settle = store.settle

    async def slow_settle(*args: object, **kwargs: object) -> object:
        await asyncio.sleep(0.2)  # a slow Redis
        return await settle(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "settle", slow_settle)
    deployment = config.models["m"].deployments[0]
    chat = ChatRequest(model="m", stream=True, include_usage=False,
                       params={"messages": [{"role": "user", "content": "hi"}]})
    ledger = Ledger(runtime, config, request_id="req-cancelled", consumer="alice", consumer_id=None, request=chat,
                    deployment=deployment, target=target_of(deployment), started=time.monotonic())
    await ledger.admit()
    ledger.first_byte = time.monotonic()
    ledger.usage.take_text([{"delta": {"content": "some words the provider charged for"}}])
    with caplog.at_level("INFO", logger="llm_gateway.usage"):
        task = asyncio.ensure_future(ledger.finish(499, error_code="client_disconnected", truncated=True))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llm_gateway.usage"]
    assert [r["request_id"] for r in records] == ["req-cancelled"] and records[0]["total_tokens"] > 0
    used, _ = await store.usage("alice", config.budgets[0])
    assert used == records[0]["total_tokens"], "settled to what was used, not left at the reservation"
    await runtime.close()


async def test_the_guard_times_the_provider_not_a_slow_client() -> None:
    from llm_gateway.errors import GatewayError
    from llm_gateway.providers.openai_compatible import Usage
    from llm_gateway.providers.stream_limits import StreamGuard

    async def provider(pause: float, n: int = 3):
        for _ in range(n):
            await asyncio.sleep(pause)
            yield b"data: {}\n\n"

    def guard() -> StreamGuard:
        return StreamGuard(Usage(), started=time.monotonic(), max_duration_s=5, idle_s=0.2)

    received = 0
    async for _ in guard().guard(provider(0.01)):
        await asyncio.sleep(0.3)  # the client reads slowly: longer than the idle time between reads
        received += 1
    assert received == 3
    with pytest.raises(GatewayError) as silent:
        async for _ in guard().guard(provider(0.5)):
            pass
    assert silent.value.code == "stream_idle_timeout"
    short = StreamGuard(Usage(), started=time.monotonic(), max_duration_s=0.3, idle_s=0.2)
    with pytest.raises(GatewayError) as long:
        async for _ in short.guard(provider(0.1, n=100)):
            pass
    assert long.value.code == "stream_max_duration"

    async def consume() -> None:  # a cancellation that is not the guard's stays a cancellation
        async for _ in guard().guard(provider(0.1, n=100)):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_silent_stream_is_ended_by_the_gateway_before_kongs_read_timeout(
        gateway: tuple[PluginServerProcess, KongHarness], hostile: HostileProvider) -> None:
    """Kong's read_timeout also bounds each gap between the listener's writes: an idle limit longer than it
    would let Kong cut the stream without a word. The gateway's idle limit is cut to fit in it."""
    server, harness = gateway
    config = dict(harness.plugin_config, limits={"stream_max_duration": 60, "stream_idle_timeout": 120})
    short = KongHarness(server.socket_path, config, CONSUMERS, service_url=f"http://{server.listen}",
                        read_timeout_ms=3000).start()
    try:
        headers, lines, _ = _stream(short.url, ERIN_KEY, "comments")
    finally:
        short.stop()
    assert _error_event(lines)["code"] == "stream_idle_timeout"  # the gateway's event, not a silent cut
    record = wait_for_record(server, headers["X-Request-ID"])
    assert record["error_code"] == "stream_idle_timeout"
