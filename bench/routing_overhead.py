"""Per-request cost of routing, ours against LiteLLM's, measured in one run against one mock provider.

Four ways to make the same call to the same mock (OpenAI format, in a separate process so its work is not
counted), one at a time, interleaved over several rounds:

    litellm          litellm.acompletion                     (LiteLLM, no routing)
    litellm-router   litellm.Router.acompletion, 2 deployments, simple-shuffle
    ours             providers.complete, the gateway's lean call (no routing)
    ours-routed      Router.route over 2 deployments (weighted) + providers.complete
    ours-routed-redis  the same, with cooldowns and in-flight counts shared through Redis (127.0.0.1:6379/15)

Reported per path: wall latency median and p99, and this process's CPU time per call (the number that
caps requests per core). Routing overhead = routed minus unrouted, for each family.

    python bench/routing_overhead.py [--calls 400] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MOCK = """
import sys, time
sys.path.insert(0, {tests!r})
from mock_provider import MockProvider
mock = MockProvider().start()
print(mock.port, flush=True)
while True:
    time.sleep(3600)
"""
MESSAGES = [{"role": "user", "content": "Say hello to the benchmark please"}]


def start_mock() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", MOCK.format(tests=str(ROOT / "tests"))], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


async def measure(call: Callable[[], Awaitable[object]], n: int) -> tuple[list[float], float]:
    """Sequential calls: wall seconds of each, and CPU seconds of this process per call."""
    walls = []
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        walls.append(time.perf_counter() - t0)
    return walls, (time.process_time() - cpu0) / n


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(calls: int, rounds: int) -> None:
    import litellm

    from llm_gateway.config import parse_config
    from llm_gateway.providers import chat as providers
    from llm_gateway.providers.openai_compatible import Usage
    from llm_gateway.routing.router import Router
    from llm_gateway.routing.state_stores.memory import MemoryRoutingState
    from llm_gateway.routing.state_stores.redis import RedisRoutingState

    mock, base = start_mock()
    try:
        config = parse_config({"models": [{"name": "bench", "deployments": [
            {"model": "openai/mock-a", "api_base": base}, {"model": "openai/mock-b", "api_base": base}]}]},
            env={})
        alias = config.models["bench"]
        state = MemoryRoutingState()
        router = Router(lambda c: state)
        import redis.asyncio as aioredis

        redis_client = aioredis.from_url("redis://127.0.0.1:6379/15")
        redis_state = RedisRoutingState(redis_client, key_prefix=f"llmgw-bench-{os.getpid()}:route:")
        redis_router = Router(lambda c: redis_state)
        lite_router = litellm.Router(model_list=[
            {"model_name": "bench", "litellm_params": {"model": f"openai/mock-{x}", "api_base": base,
                                                       "api_key": "none"}} for x in "ab"],
            num_retries=0)
        params = {"messages": MESSAGES}  # as chat_request leaves them: the alias is not a provider parameter
        n = [0]

        async def lite() -> object:
            return await litellm.acompletion(model="openai/mock-a", api_base=base, api_key="none", messages=MESSAGES)

        async def lite_routed() -> object:
            return await lite_router.acompletion(model="bench", messages=MESSAGES)

        async def ours() -> object:
            return await providers.complete(alias.deployments[0], params, Usage())

        def routed_by(r: Router) -> Callable[[], Awaitable[object]]:
            async def call() -> object:
                n[0] += 1
                usage = Usage()
                routed = await r.route(config, alias, f"r{n[0]}",
                                       lambda d: providers.complete(d, params, usage), lambda a, d: None)
                await routed.done(0)
                return routed.result
            return call

        paths = {"litellm": lite, "litellm-router": lite_routed, "ours": ours, "ours-routed": routed_by(router),
                 "ours-routed-redis": routed_by(redis_router)}
        for call in paths.values():  # warm up connections, imports and caches
            for _ in range(20):
                await call()
        walls: dict[str, list[float]] = {k: [] for k in paths}
        cpus: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for name, call in paths.items():
                w, c = await measure(call, calls // rounds)
                walls[name] += w
                cpus[name].append(c)
        rows = {name: {"p50_ms": statistics.median(walls[name]) * 1000, "p99_ms": pct(walls[name], 0.99) * 1000,
                       "cpu_ms": statistics.median(cpus[name]) * 1000} for name in paths}
        from importlib.metadata import version

        print(f"routing overhead, {calls} sequential calls per path, {rounds} interleaved rounds, "
              f"python {sys.version.split()[0]}, litellm {version('litellm')}")
        print("| path | p50 ms | p99 ms | CPU ms/call |\n|---|---:|---:|---:|")
        for name, row in rows.items():
            print(f"| {name} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['cpu_ms']:.3f} |")
        for family, routed in (("litellm", "litellm-router"), ("ours", "ours-routed"), ("ours", "ours-routed-redis")):
            print(f"{routed} adds p50 {rows[routed]['p50_ms'] - rows[family]['p50_ms']:+.3f} ms, "
                  f"p99 {rows[routed]['p99_ms'] - rows[family]['p99_ms']:+.3f} ms, "
                  f"CPU {rows[routed]['cpu_ms'] - rows[family]['cpu_ms']:+.3f} ms per call")
        print(json.dumps(rows))
        await redis_client.aclose()
    finally:
        mock.terminate()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds))
