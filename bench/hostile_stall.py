"""How much one client's hostile body slows everyone else: victims' latency while another client sends it.

A victim thread sends small OpenAI-format requests in sequence; an attacker thread sends one kind of hostile
body to an Anthropic alias in a loop. Reported per kind: the victims' p50/p99, and what the attacker got
back (status, its own p50). Issue 10 item 6 measured a 300-level tool schema taking the victims' median
from 3.7 ms to 702 ms; with the gateway's bounded parsing it is refused before LiteLLM sees it.

    python bench/hostile_stall.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from stack import CLIENT_KEY, CONSUMERS, PROVIDER_KEY, KongHarness, free_port, mock_provider, start_plugin_server

VICTIM = {"model": "gpt", "messages": [{"role": "user", "content": "Say hello to the benchmark please"}]}


def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def tools(n: int, depth: int) -> list[dict]:
    return [{"type": "function", "function": {"name": f"f{i}", "parameters": nested_schema(depth)}}
            for i in range(n)]


HI = [{"role": "user", "content": "hi"}]
HOSTILE: dict[str, bytes] = {
    "none (baseline)": b"",
    "tool schema nested 300 levels (12 KB)": json.dumps({"model": "claude", "messages": HI,
                                                         "tools": tools(1, 300)}).encode(),
    "JSON nested 1,000 levels": b'{"model": "claude", "messages": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    "4,301-digit integer": b'{"model": "claude", "messages": [], "seed": ' + b"9" * 4301 + b"}",
    "valid: 100 tools nested 20 levels (~200 KB)": json.dumps({"model": "claude", "messages": HI, "max_tokens": 5,
                                                               "tools": tools(100, 20)}).encode(),
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def run(url: str, hostile: bytes, seconds: float) -> tuple[list[float], Counter[int], list[float]]:
    stop = threading.Event()
    statuses: Counter[int] = Counter()
    attacker_times: list[float] = []

    def attack() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                started = time.perf_counter()
                response = client.post(url, content=hostile, headers={"apikey": CLIENT_KEY,
                                                                      "Content-Type": "application/json"})
                attacker_times.append(time.perf_counter() - started)
                statuses[response.status_code] += 1

    attacker = threading.Thread(target=attack, daemon=True)
    if hostile:
        attacker.start()
    victims: list[float] = []
    with httpx.Client(timeout=60) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            client.post(url, json=VICTIM, headers={"apikey": CLIENT_KEY}).raise_for_status()
            victims.append(time.perf_counter() - started)
    stop.set()
    if hostile:
        attacker.join(60)
    return victims, statuses, attacker_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with mock_provider() as mock:
        sock = str(Path(tempfile.mkdtemp(prefix="bench-kong-")) / "llm-gateway.sock")
        server = start_plugin_server(sock, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                     env={"BENCH_PROVIDER_KEY": PROVIDER_KEY})
        key = {"api_key_env": "BENCH_PROVIDER_KEY"}
        config = {"max_body_bytes": 1_048_576, "models": [
            {"name": "gpt", "deployments": [{"model": "openai/mock-gpt", "api_base": mock.openai_base, **key}]},
            {"name": "claude", "deployments": [{"model": "anthropic/mock-claude", "api_base": mock.base_url, **key}]},
        ]}
        try:
            with KongHarness(sock, config, CONSUMERS, service_url=f"http://{server.listen}") as kong:
                url = f"{kong.url}/v1/chat/completions"
                run(url, b"", 1.0)  # warm up
                print(f"{args.seconds:g} s per row; victims: sequential small OpenAI-format requests\n")
                print("| attacker sends | victims p50 ms | victims p99 ms | attacker got | attacker p50 ms |")
                print("|---|---|---|---|---|")
                for name, body in HOSTILE.items():
                    victims, statuses, attacker = run(url, body, args.seconds)
                    got = ", ".join(f"{n}x {s}" for s, n in sorted(statuses.items())) or "-"
                    print(f"| {name} | {pct(victims, 0.5):.1f} | {pct(victims, 0.99):.1f} | {got} | "
                          f"{pct(attacker, 0.5):.1f} |")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
