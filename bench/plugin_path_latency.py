"""Added latency of the whole plugin path over a direct call to the same mock provider, one run, interleaved.

direct:  client → mock provider (OpenAI wire format)
gateway: client → Kong-side harness (key-auth, access phase over the real socket, proxy) → plugin server's
         listener → LiteLLM → the same mock provider

The harness is a Python stand-in for Kong's nginx, so its own proxying is counted in the overhead: the figure
is an upper bound of what the plugin adds inside a real Kong. Also reports the plugin server's RSS. Sequential
requests, no load: the floor under bench/run's loaded figures. The processes are started by bench/stack.py, as
bench/run starts them (the mock provider in its own process since bench/run was added).

    python bench/plugin_path_latency.py [--requests 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
from stack import CLIENT_KEY, PROVIDER_KEY, mock_provider, plugin_path, rss_mb

BODY = {"model": "gpt-bench", "messages": [{"role": "user", "content": "Say hello to the benchmark please"}]}


def timed(client: httpx.Client, url: str, body: dict, headers: dict, stream: bool) -> float:
    """Seconds to the full JSON body, or to the first content chunk of a stream."""
    started = time.perf_counter()
    if not stream:
        response = client.post(url, json=body, headers=headers)
        response.raise_for_status()
        return time.perf_counter() - started
    with client.stream("POST", url, json=dict(body, stream=True), headers=headers) as response:
        response.raise_for_status()
        first = None
        for line in response.iter_lines():
            compact = line.replace(" ", "")
            if first is None and '"content":"' in compact and '"content":""' not in compact:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("stream had no content")
    return first


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with mock_provider() as mock, plugin_path({"gpt-bench": "mock-gpt"}, mock) as path:
        rss_start = rss_mb(path.server.pid)
        with httpx.Client(timeout=30) as client:
            targets = {
                "direct": (f"{mock.openai_base}/chat/completions", dict(BODY, model="mock-gpt"),
                           {"Authorization": f"Bearer {PROVIDER_KEY}"}),
                "gateway": (f"{path.url}/v1/chat/completions", BODY, {"apikey": CLIENT_KEY}),
            }
            results: dict[tuple[str, bool], list[float]] = {(t, s): [] for t in targets for s in (False, True)}
            for i in range(args.requests + 20):  # interleaved A B A B; the first 20 warm up
                for (target, stream), samples in results.items():
                    elapsed = timed(client, *targets[target], stream=stream)
                    if i >= 20:
                        samples.append(elapsed)
        rss_end = rss_mb(path.server.pid)
    print(f"{args.requests} sequential requests per cell, interleaved, mock provider with no added latency\n")
    print("| measure | direct p50 | gateway p50 | overhead p50 | direct p99 | gateway p99 | overhead p99 |")
    print("|---|---|---|---|---|---|---|")
    for stream, label in ((False, "JSON, full response (ms)"), (True, "stream, time to first token (ms)")):
        d, g = results[("direct", stream)], results[("gateway", stream)]
        d50, g50, d99, g99 = pct(d, 0.5), pct(g, 0.5), pct(d, 0.99), pct(g, 0.99)
        print(f"| {label} | {d50:.2f} | {g50:.2f} | {g50 - d50:.2f} | {d99:.2f} | {g99:.2f} | {g99 - d99:.2f} |")
    print(f"\nplugin server RSS: {rss_start:.0f} MB after startup, {rss_end:.0f} MB after the run")
    print(f"mean gateway JSON latency {statistics.mean(results[('gateway', False)]) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
