"""Where the latency of `ours` goes inside the Kong-side harness: what is the plugin's, what is the stand-in's.

bench/run measures the plugin path through tests/kong_harness.py, whose access phase runs in a thread pool
with blocking RPC calls and whose proxy is aiohttp. This wraps (without changing) three of its methods to time,
per request, at fixed open-loop rates (bench/loadgen.py, mock latency 0 ms):

* access: the access phase in a harness thread: Kong's 4 RPC round trips to our plugin server;
* hop: from that thread's end to the proxy starting on the harness's event loop: harness only (nginx has none);
* proxy: the proxied request to our listener, until the response has been forwarded (listener + mock).

    python bench/harness_breakdown.py [--rates 50 150] [--duration 8]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import gateway_bench
import stack
from report import pct

from kong_harness import KongHarness

STAGES: dict[str, list[float]] = {"access": [], "hop": [], "proxy": []}
_ACCESS_END: dict[int, float] = {}  # id(request ctx) → when its access phase ended


def instrument() -> None:
    """Wrap KongHarness._access and _proxy with timers (ms into STAGES); behaviour unchanged."""
    access, proxy = KongHarness._access, KongHarness._proxy

    def timed_access(self: KongHarness, ctx: Any, trace: list[str]) -> None:
        started = time.perf_counter()
        try:
            access(self, ctx, trace)
        finally:
            ended = _ACCESS_END[id(ctx)] = time.perf_counter()
            STAGES["access"].append((ended - started) * 1000)

    async def timed_proxy(self: KongHarness, request: Any, ctx: Any, ids: dict[str, str]) -> Any:
        started = time.perf_counter()
        STAGES["hop"].append((started - _ACCESS_END.pop(id(ctx), started)) * 1000)
        try:
            return await proxy(self, request, ctx, ids)
        finally:
            STAGES["proxy"].append((time.perf_counter() - started) * 1000)

    KongHarness._access, KongHarness._proxy = timed_access, timed_proxy  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[50.0, 150.0])
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    instrument()
    print("| req/s | direct p50 / p99 | ours p50 / p99 | harness access phase (4 RPCs) | harness thread → loop hop "
          "| proxy to our listener | plugin-server CPU ms/req |")
    print("|---|---|---|---|---|---|---|")
    settings = gateway_bench.Settings(1, 1.0, args.duration, 0.0)
    with stack.mock_provider() as mock, stack.plugin_path(dict(gateway_bench.ALIASES.values()), mock) as path:
        direct, ours = gateway_bench.direct_system(mock), gateway_bench.ours_system(path)
        loadgen = gateway_bench.LoadGen()
        try:
            loadgen.run(gateway_bench.task(ours, "0 ms", "saturate", False, settings))  # warm up
            for rate in args.rates:
                base = loadgen.run(gateway_bench.task(direct, "0 ms", "rate", False, settings, rate))["latency"]
                for samples in STAGES.values():
                    samples.clear()
                result = loadgen.run(gateway_bench.task(ours, "0 ms", "rate", False, settings, rate))
                cpu = 1000 * result["cpu"][str(path.server.pid)] / result["requests"]
                cells = [f"{pct(v, 0.5):.2f} / {pct(v, 0.99):.2f}" for v in
                         (base, result["latency"], *STAGES.values())]
                print(f"| {rate:g} | " + " | ".join(cells) + f" | {cpu:.2f} |")
        finally:
            loadgen.close()


if __name__ == "__main__":
    main()
