"""The load generator of bench/run: an asyncio aiohttp client in a process of its own.

A separate process so that its CPU and GIL are not the benchmark's, and so that the harness (which runs in
the benchmark's process, as in the tests) gets a core's worth of GIL to itself. It still shares the machine's
cores with the systems under test: that is stated in the output.

Protocol: one JSON task per line on stdin; the result, as JSON, in the file the task names (results run to
megabytes of samples: a file, not a pipe), then "done" on stdout; until stdin closes. A task:

    {"mode": "saturate" | "rate", "url", "method": "POST" (default) | "GET" (no body), "headers", "body",
     "stream": bool,
     "concurrency": int (saturate), "min_requests": int (saturate, optional), "rate": float requests/s (rate),
     "warmup": s, "duration": s, "result_path": where to write the result,
     "cpu_pids": [pid, ...], "stream_every": int (rate only; 0: never, k: every k-th request streams)}

* saturate: closed loop, `concurrency` workers each sending the next request as soon as one completes;
* rate: open loop, request i is sent at start + i / rate whatever happened before, and its latency counts from
  that scheduled instant, so that a server falling behind shows as latency (no coordinated omission).

The result has the requests completed in the measured window (after the warm-up), errors, the window's length,
the CPU seconds each pid in `cpu_pids` spent over exactly that window (read from /proc here, at the edges of
the window), and the raw samples in ms: latency (JSON requests), ttft and total (streams), chunks per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from stack import cpu_seconds


@dataclass
class Record:
    """One request: when it ended, and its timings in ms (latency for JSON; ttft, total, chunks for streams)."""

    end: float
    latency: float | None = None
    ttft: float | None = None
    total: float | None = None
    chunks: int = 0
    error: str | None = None


def _has_content(line: bytes) -> bool:
    """Whether an SSE data line carries a non-empty content delta (whatever the JSON spacing)."""
    if b'"content"' not in line:
        return False
    try:
        choices = json.loads(line[5:]).get("choices") or [{}]
    except ValueError:
        return False
    return bool((choices[0].get("delta") or {}).get("content"))


async def one(session: aiohttp.ClientSession, task: dict[str, Any], stream: bool, started: float) -> Record:
    """One request, timed from `started`."""
    method = task.get("method", "POST")
    body = None if method == "GET" else dict(task["body"], stream=True) if stream else task["body"]
    try:
        async with session.request(method, task["url"], json=body, headers=task["headers"]) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
            if not stream:
                await response.read()
                now = time.perf_counter()
                return Record(now, latency=(now - started) * 1000)
            first, chunks = None, 0
            async for line in response.content:
                if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                    continue
                chunks += 1
                if first is None and _has_content(line):
                    first = time.perf_counter()
            now = time.perf_counter()
            if first is None:
                raise RuntimeError("stream without content")
            return Record(now, ttft=(first - started) * 1000, total=(now - started) * 1000, chunks=chunks)
    except Exception as exc:
        return Record(time.perf_counter(), error=f"{type(exc).__name__}: {exc}")


def _cpu(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


MAX_WINDOW = 60.0  # seconds: how far min_requests may stretch a saturation window
Measured = tuple[list[Record], float, dict[int, float]]  # records, window seconds, CPU seconds per pid


async def saturate(session: aiohttp.ClientSession, task: dict[str, Any]) -> Measured:
    """Closed loop. Counted: the requests that end inside the window [warm-up end, + duration, longer until
    min_requests ended], whenever they started (steady state: throughput is completions per second); the drain
    after it is not measured."""
    stop, records, counting = False, [], {"from": math.inf}
    enough = asyncio.Event()

    async def worker() -> None:
        while not stop:
            records.append(await one(session, task, task["stream"], time.perf_counter()))
            if len(records) - counting["from"] >= task.get("min_requests", 0):
                enough.set()

    workers = [asyncio.create_task(worker()) for _ in range(task["concurrency"])]
    await asyncio.sleep(task["warmup"])
    cpu0, t0, counting["from"] = _cpu(task["cpu_pids"]), time.perf_counter(), len(records)
    await asyncio.sleep(task["duration"])
    with contextlib.suppress(TimeoutError):  # a slow system gets a longer window rather than a count of ~nothing
        await asyncio.wait_for(enough.wait(), MAX_WINDOW)
    cpu1, t1 = _cpu(task["cpu_pids"]), time.perf_counter()
    stop = True
    await asyncio.gather(*workers)
    return [r for r in records if t0 <= r.end <= t1], t1 - t0, {pid: cpu1[pid] - cpu0[pid] for pid in cpu0}


async def fixed_rate(session: aiohttp.ClientSession, task: dict[str, Any]) -> Measured:
    """Open loop at task["rate"]. Counted: every request scheduled after the warm-up, each timed from its
    scheduled instant; the window runs until the last of them ends."""
    rate, every = task["rate"], task.get("stream_every", 1 if task["stream"] else 0)
    n_warm, n_total = int(task["warmup"] * rate), int((task["warmup"] + task["duration"]) * rate)
    start, pending, measured = time.perf_counter() + 0.01, [], []
    cpu0, t0 = _cpu(task["cpu_pids"]), start
    for i in range(n_total):
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        if i == n_warm:
            cpu0, t0 = _cpu(task["cpu_pids"]), time.perf_counter()
        request = asyncio.create_task(one(session, task, bool(every) and i % every == 0, scheduled))
        (measured if i >= n_warm else pending).append(request)
    records = await asyncio.gather(*measured)
    cpu1, t1 = _cpu(task["cpu_pids"]), time.perf_counter()
    await asyncio.gather(*pending)
    return list(records), t1 - t0, {pid: cpu1[pid] - cpu0[pid] for pid in cpu0}


async def run(task: dict[str, Any]) -> dict[str, Any]:
    limit = task["concurrency"] if task["mode"] == "saturate" else 0
    connector = aiohttp.TCPConnector(limit=limit)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        measure = saturate if task["mode"] == "saturate" else fixed_rate
        records, window, cpu = await measure(session, task)
    ok = [r for r in records if r.error is None]
    errors = [r.error for r in records if r.error is not None]
    return {"requests": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
            "window": window, "cpu": {str(k): v for k, v in cpu.items()},
            "latency": [r.latency for r in ok if r.latency is not None],
            "ttft": [r.ttft for r in ok if r.ttft is not None], "total": [r.total for r in ok if r.total is not None],
            "chunks": [r.chunks for r in ok if r.ttft is not None]}


def main() -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    for line in sys.stdin:
        if line.strip():
            task = json.loads(line)
            Path(task["result_path"]).write_text(json.dumps(asyncio.run(run(task))))
            print("done", flush=True)


if __name__ == "__main__":
    main()
