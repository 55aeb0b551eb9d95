"""What tracing costs a request: the tracing hooks of one LLM request (operations/tracing.py), off and on, in this
process.

One "request" runs exactly the hook calls the listener and the ledger make for a JSON request that is served by
its first attempt: ``start_request``, ``attempt``, the router's call through ``traced_call``, ``finish_request``
with a real usage record, ``end_request``. Three variants, interleaved over rounds:

    baseline   the same awaited call, no hooks at all
    off        the hooks, tracing off (the default): each returns at once, the call is not wrapped
    on         the hooks, tracing on: SDK spans, BatchSpanProcessor, an exporter that drops what it gets
               (export runs in the SDK's thread; what it would cost to send depends on the collector)

Reported: CPU nanoseconds per request (process_time, min and median over rounds), and the difference to
baseline; compare with the plugin server's ~1,100-1,600 us of CPU per request (docs/performance.md).

    python bench/tracing_overhead.py [--requests 20000] [--rounds 7]

``--end-to-end``: the whole plugin path instead (bench/stack.py: the Kong-side harness, a plugin server, the mock
provider in its own process), two plugin servers side by side, one with tracing off and one exporting every
span over OTLP/HTTP to a local receiver (tests/otlp_receiver.py, which decodes them); sequential JSON requests,
interleaved rounds; reported: the plugin server's CPU ms per request (utime+stime) and the latency median.

    python bench/tracing_overhead.py --end-to-end [--requests 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kong-plugins"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

HEADERS = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "content-type": "application/json"}
PARAMS = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "temperature": 0.2}


def _fixtures() -> tuple[Any, Any, Any]:
    from llm_gateway.accounting.records import UsageRecord
    from llm_gateway.accounting.tokens import TokenUsage
    from llm_gateway.config import Deployment
    from llm_gateway.providers.openai_compatible import Usage

    deployment = Deployment("openai/gpt-4o-mini", None, None, 60.0, id="chat#0")
    record = UsageRecord(request_id="r", consumer="alice", consumer_id="c", route="route", alias="chat",
                         provider="openai", model="gpt-4o-mini", stream=False, status=200, error_code=None,
                         usage=TokenUsage(20, 10, 30, 0, 0, False), cost_usd=1e-5, latency_ms=12.0, ttft_ms=None,
                         deployment="chat#0")
    usage = Usage()
    usage.finish_reasons.append("stop")
    return deployment, record, usage


async def _provider(deployment: Any) -> bytes:
    return b"{}"


def _variant(tracing: Any, hooks: bool) -> Callable[[], Awaitable[None]]:
    deployment, record, usage = _fixtures()

    if not hooks:
        async def baseline() -> None:
            await _provider(deployment)
        return baseline

    async def request() -> None:
        tracing.start_request(HEADERS, "0123456789abcdef0123456789abcdef")
        tracing.attempt("chat", deployment)
        await tracing.traced_call(_provider)(deployment)
        tracing.finish_request(record, PARAMS, usage)
        tracing.end_request(200, None)
    return request


async def _measure(run: Callable[[], Awaitable[None]], requests: int) -> float:
    """CPU ns per request; each request in a task of its own, as aiohttp runs each request's handler."""
    started = time.process_time_ns()
    for _ in range(requests):
        await asyncio.get_running_loop().create_task(run())
    return (time.process_time_ns() - started) / requests


class _Dropping:
    """A SpanExporter that accepts and drops everything."""

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


async def main(requests: int, rounds: int) -> None:
    import llm_gateway.operations.tracing as off_module

    # the batch processor's thread must keep up (the default queue of 2048 fills and drops spans here)
    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "50")
    os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", "65536")

    assert not off_module.enabled()
    on_module = importlib.util.module_from_spec(importlib.util.find_spec("llm_gateway.operations.tracing"))  # 2nd copy
    on_module.__spec__.loader.exec_module(on_module)  # type: ignore[union-attr]
    assert on_module.configure({}, exporter=_Dropping())
    variants = {"baseline": _variant(off_module, False), "off": _variant(off_module, True),
                "on": _variant(on_module, True)}
    for run in variants.values():  # warm up
        await _measure(run, 2000)
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            results[name].append(await _measure(run, requests))
    on_module.shutdown()
    base = statistics.median(results["baseline"])
    print(f"python {sys.version.split()[0]}, {requests} requests x {rounds} rounds, CPU ns per request")
    print(f"{'variant':10} {'min':>9} {'median':>9} {'vs baseline (median)':>22}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:10} {min(values):9.0f} {median:9.0f} {median - base:+20.0f} ns")


def end_to_end(requests: int, rounds: int) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import httpx
    from stack import CLIENT_KEY, cpu_seconds, mock_provider, plugin_path

    from otlp_receiver import Receiver

    receiver = Receiver()
    body = {"model": "gpt-bench", "messages": [{"role": "user", "content": "Say hello to the benchmark please"}]}
    traced = {"LLM_GATEWAY_TRACING": "on", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
              "OTEL_BSP_SCHEDULE_DELAY": "200"}
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    with mock_provider() as mock, plugin_path({"gpt-bench": "mock-gpt"}, mock) as off, \
            plugin_path({"gpt-bench": "mock-gpt"}, mock, env=traced) as on, httpx.Client(timeout=30) as http:
        paths = {"off": off, "on": on}
        for path in paths.values():  # warm up
            for _ in range(50):
                http.post(f"{path.url}/v1/chat/completions", json=body, headers={"apikey": CLIENT_KEY})
        for _ in range(rounds):
            for name, path in paths.items():
                cpu, latencies = cpu_seconds(path.server.pid), []
                for _ in range(requests):
                    started = time.perf_counter()
                    response = http.post(f"{path.url}/v1/chat/completions", json=body, headers={"apikey": CLIENT_KEY})
                    latencies.append(time.perf_counter() - started)
                    assert response.status_code == 200, response.text
                results[name].append(((cpu_seconds(path.server.pid) - cpu) / requests * 1000,
                                      statistics.median(latencies) * 1000))
        time.sleep(1)
    spans = len(receiver.spans)
    receiver.server.shutdown()
    print(f"{requests} sequential JSON requests x {rounds} rounds per server; {spans} spans received from the "
          "traced one")
    print(f"{'tracing':8} {'server CPU ms/request (median of rounds)':>40} {'latency median ms':>19}")
    for name, values in results.items():
        cpu, latency = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        print(f"{name:8} {cpu:40.3f} {latency:19.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--end-to-end", action="store_true")
    options = parser.parse_args()
    if options.end_to_end:
        end_to_end(options.requests or 400, options.rounds or 5)
        sys.exit(0)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(options.requests or 20000, options.rounds or 7))
