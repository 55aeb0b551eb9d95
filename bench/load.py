"""Load test of issue 10: 300 concurrent budgeted requests (six waves: 1,800 requests) and 200 concurrent
streams through the Kong-side harness and the plugin server, with budgets, leases and the usage stream in
Redis. Not a timed test: it reports, and exits non-zero when a request failed or accounting is off.

    bench/run --load            (or: python bench/load.py [--waves N] [--json PATH])

Reported: errors by kind, TTFT p50/p99 of the streams, latency p50/p99 of the JSON requests, the plugin
server's RSS and open file descriptors before, after, and after a rest (--rest, 5 s), the accounting checks: the
budget counter equals the tokens the responses reported (no settlement lost), no lease left, one usage
record per request in the stream; and the plugin server's warnings (none expected: no routing state falling
back to local, no failed usage-stream write).

Redis is a redis-server of the bench's own on a free port (when installed), so the load never slows the
Redis other people's tests share; else db 15 of 127.0.0.1:6379 under a per-run prefix. The load generator
is a process of its own (an asyncio aiohttp client), as in bench/loadgen.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from stack import CLIENT_KEY, CONSUMERS, PROVIDER_KEY, free_port, mock_provider, rss_mb  # noqa: E402

BUDGET_TOKENS = 1_000_000_000


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _tcp_ports() -> dict[str, tuple[int, int]]:
    """socket inode -> (local port, remote port), from /proc/net/tcp{,6}."""
    out = {}
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            out[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return out


def fd_kinds(pid: int, ports: dict[str, int]) -> dict[str, int]:
    """The plugin server's open fds by what they are: TCP connections by the named port they talk to (as
    client: the remote port; as server: the local one), other sockets, other files."""
    tcp = _tcp_ports()
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = "file"
        if target.startswith("socket:["):
            local, remote = tcp.get(target[8:-1], (0, 0))
            kind = next((name for name, port in ports.items() if port in (remote, local)), "other socket")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the client process ------------------------------------------------------------------------------------
async def _wave(task: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    out: dict[str, Any] = {"status": {}, "errors": [], "latency": [], "ttft": [], "tokens": 0, "ids": []}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one(i: int) -> None:
            body: dict[str, Any] = {"model": task["model"], "stream": task["stream"],
                                    "messages": [{"role": "user", "content": f"request {i} of the load test"}]}
            if task["stream"]:
                body["stream_options"] = {"include_usage": True}
            started = time.perf_counter()
            try:
                async with session.post(task["url"], json=body, headers={"apikey": CLIENT_KEY}) as response:
                    out["status"][str(response.status)] = out["status"].get(str(response.status), 0) + 1
                    out["ids"].append(response.headers.get("X-Request-ID"))
                    if response.status != 200:
                        out["errors"].append(f"HTTP {response.status}: {(await response.read())[:160]!r}")
                        return
                    if not task["stream"]:
                        await response.read()
                        out["latency"].append((time.perf_counter() - started) * 1000)
                        out["tokens"] += int(response.headers.get("X-LLM-Total-Tokens", 0))
                        return
                    first, done = None, False
                    async for line in response.content:
                        if first is None and line.startswith(b"data: {") and b'"content"' in line:
                            first = time.perf_counter()
                        if line.startswith(b"data: [DONE]"):
                            done = True
                        elif line.startswith(b"data: {") and b'"usage"' in line:
                            usage = json.loads(line[6:]).get("usage") or {}
                            out["tokens"] += int(usage.get("total_tokens") or 0)
                        if b'"error"' in line:
                            out["errors"].append(f"stream error event: {line[:160]!r}")
                    if not done:
                        out["errors"].append("stream ended without [DONE]")
                    elif first is not None:
                        out["ttft"].append((first - started) * 1000)
            except Exception as exc:
                out["errors"].append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(i) for i in range(task["concurrency"])))
    return out


def client_main() -> None:
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(asyncio.run(_wave(json.loads(line)))), flush=True)


class Client:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "_client"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def wave(self, **task: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(10)


# -- the bench ---------------------------------------------------------------------------------------------
def _redis() -> tuple[Any, str]:
    from own_redis import OwnRedis, installed

    if installed():
        own = OwnRedis().start()
        return own, own.url
    return None, "redis://127.0.0.1:6379/15"


def _config(url: str, prefix: str, base: str) -> dict[str, Any]:
    models = {"json": "mock-gpt-words-20", "stream": "mock-gpt-words-50-drip-20"}
    return {
        "redis": {"url": url, "key_prefix": prefix, "usage_stream": f"{prefix}usage"},
        "budgets": [{"name": "bench-daily", "window": "day", "tokens": BUDGET_TOKENS}],
        "routing": {"retries": 0},
        "models": [{"name": alias, "deployments": [{"model": f"openai/{model}", "api_base": base,
                                                      "api_key_env": "BENCH_PROVIDER_KEY"}]}
                   for alias, model in models.items()],
    }


def _accounting(url: str, prefix: str, ids: set[str]) -> dict[str, Any]:
    import redis

    r = redis.Redis.from_url(url)
    used = sum(int(r.hget(k, "t") or 0) for k in r.scan_iter(match=f"{prefix}budget:{{bench}}:*:day:*"))
    leases = r.zcard(f"{prefix}budget:{{bench}}:leases")
    per_id: dict[str, int] = {}
    for _, fields in r.xrange(f"{prefix}usage"):
        rid = fields[b"request_id"].decode()
        per_id[rid] = per_id.get(rid, 0) + 1
    return {"budget_used": used, "leases_left": leases, "records": sum(per_id.values()),
            "requests_without_record": len(ids - set(per_id)),
            "records_twice": sum(1 for n in per_id.values() if n > 1)}


def run(waves: int, streams: int, concurrency: int, rest: float = 5.0) -> dict[str, Any]:
    from kong_harness import KongHarness, start_plugin_server

    own, url = _redis()
    prefix = f"llmgw-load-{secrets.token_hex(4)}:"
    result: dict[str, Any] = {"redis": "own redis-server" if own else url}
    client = Client()
    try:
        with mock_provider() as mock:
            sock = str(Path(tempfile.mkdtemp(prefix="bench-load-")) / "llm-gateway.sock")
            server = start_plugin_server(sock, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                         env={"BENCH_PROVIDER_KEY": PROVIDER_KEY, "LLM_GATEWAY_METRICS_LISTEN": "off"})
            try:
                with KongHarness(sock, _config(url, prefix, mock.openai_base), CONSUMERS,
                                 service_url=f"http://{server.listen}") as kong:
                    endpoint = f"{kong.url}/v1/chat/completions"
                    warm = client.wave(url=endpoint, model="json", stream=False, concurrency=10)
                    before = {"rss_mb": rss_mb(server.pid), "fds": fds(server.pid)}
                    ids: set[str] = {i for i in warm["ids"] if i}
                    tokens, latency, ttft, errors, statuses = warm["tokens"], [], [], list(warm["errors"]), {}
                    started = time.perf_counter()
                    for _ in range(waves):
                        out = client.wave(url=endpoint, model="json", stream=False, concurrency=concurrency)
                        tokens += out["tokens"]
                        latency += out["latency"]
                        errors += out["errors"]
                        ids |= {i for i in out["ids"] if i}
                        for k, v in out["status"].items():
                            statuses[k] = statuses.get(k, 0) + v
                    json_s = time.perf_counter() - started
                    out = client.wave(url=endpoint, model="stream", stream=True, concurrency=streams)
                    ttft, errors, tokens = out["ttft"], errors + out["errors"], tokens + out["tokens"]
                    ids |= {i for i in out["ids"] if i}
                    for k, v in out["status"].items():
                        statuses[k] = statuses.get(k, 0) + v
                    after = {"rss_mb": rss_mb(server.pid), "fds": fds(server.pid)}
                    time.sleep(rest)
                    rested = {"rss_mb": rss_mb(server.pid), "fds": fds(server.pid)}
                    named = {"redis": int(url.rsplit(":", 1)[1].split("/")[0]),
                             "provider (mock)": int(mock.base_url.rsplit(":", 1)[1]),
                             "listener (from Kong)": int(server.listen.rsplit(":", 1)[1])}
                    rested["by_kind"] = fd_kinds(server.pid, named)
                    accounting = _accounting(url, prefix, ids)
                    accounting["tokens_the_responses_reported"] = tokens
                    log = server.stderr_text().splitlines()
                    warnings = [line.split(" ", 3)[-1][:200] for line in log
                                if " WARNING " in line or " ERROR " in line]
                    result.update({
                        "json": {"requests": waves * concurrency, "concurrency": concurrency, "seconds": json_s,
                                 "latency_p50_ms": pct(latency, 0.5), "latency_p99_ms": pct(latency, 0.99)},
                        "streams": {"requests": streams, "ttft_p50_ms": pct(ttft, 0.5),
                                    "ttft_p99_ms": pct(ttft, 0.99),
                                    "ttft_mean_ms": statistics.fmean(ttft) if ttft else float("nan")},
                        "status": statuses, "errors": len(errors), "first_errors": errors[:5],
                        "plugin_server": {"before": before, "after": after, f"after_{rest:g}s_rest": rested},
                        "accounting": accounting,
                        # e.g. routing state falling back to local, usage-stream writes failing: none expected
                        "plugin_server_warnings": len(warnings), "first_warnings": warnings[:5],
                    })
            finally:
                server.stop()
    finally:
        client.close()
        if own:
            own.stop()
    return result


def main() -> int:
    if sys.argv[1:2] == ["_client"]:
        client_main()
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waves", type=int, default=6, help="waves of concurrent JSON requests (default 6)")
    parser.add_argument("--concurrency", type=int, default=300, help="JSON requests per wave (default 300)")
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams (default 200)")
    parser.add_argument("--rest", type=float, default=5.0,
                        help="seconds to wait before the last RSS/fd reading (keep-alive connections close "
                             "after 60 s idle: --rest 65 shows what remains)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = run(args.waves, args.streams, args.concurrency, args.rest)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    acc = result["accounting"]
    ok = (result["errors"] == 0 and acc["leases_left"] == 0 and acc["requests_without_record"] == 0
          and acc["records_twice"] == 0 and acc["budget_used"] == acc["tokens_the_responses_reported"]
          and result["plugin_server_warnings"] == 0)
    print("OK" if ok else "FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
