"""bench/run: our plugin path against LiteLLM Proxy and the direct call, on one machine, in one run.

Three systems in front of one mock provider (tests/mock_provider.py, its own process), at two mock latencies
(0 ms and 60 ms before the response headers; 50 content chunks per stream):

* direct: load generator → mock;
* ours: load generator → the Kong-side harness (tests/kong_harness.py, in this process, as the tests drive it)
  → our plugin server's listener → mock. No real Kong is driven (see kong_note());
* LiteLLM Proxy: load generator → `litellm --num_workers 1` with the same models → mock.

Cells are measured interleaved (A B C A B C …, several rounds) so that a drift of the machine hits every
system alike. Saturation first (closed loop), then the fixed rates derived from it (open loop). See
docs/performance.md for what each figure means and the last full run's numbers.

When a Kong binary is found (KONG_BIN, or `kong` on PATH), bench/kong_bench.py then measures the same plugin
inside that real Kong, side by side with Kong alone, Kong's ai-proxy and Kong → LiteLLM Proxy (its own table);
`--kong` runs only that part, `--no-kong` skips it.

    bench/run [--smoke] [--rounds N] [--duration S] [--kong | --no-kong]
    bench/run --soak [--minutes N] [--soak-rate R]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import report
import stack
from report import Cell, SystemInfo

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
# client model alias → the mock's model name: `slow-<ms>` before the headers, `words-50`: 50 content chunks
ALIASES = {"0 ms": ("bench-0ms", "mock-words-50"), "60 ms": ("bench-60ms", "mock-slow-60-words-50")}
CONCURRENCY = {"0 ms": 16, "60 ms": 64}  # 60 ms needs more requests in flight to keep the servers busy
MESSAGES = [{"role": "user", "content": "Say hello to the benchmark please"}]


@dataclass
class Settings:
    rounds: int
    warmup: float  # seconds per cell, not counted
    duration: float  # seconds measured per cell
    prewarm: float  # seconds of load per system and profile before the first cell, not counted
    min_samples: int = 0  # a cell lasts long enough for this many requests per round
    profiles: tuple[str, ...] = tuple(ALIASES)


@dataclass
class System:
    info: SystemInfo
    url: str
    headers: dict[str, str]
    models: dict[str, str]  # profile → the body's model
    pids: dict[str, int]  # process label → pid, CPU read over every measured window


class LoadGen:
    """bench/loadgen.py in its own process: a task per line in, its result in a file, "done" per line out."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "loadgen.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.result_path = Path(tempfile.mkdtemp(prefix="bench-loadgen-")) / "result.json"

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(dict(task, result_path=str(self.result_path))) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if line.strip() != "done":
            raise RuntimeError(f"the load generator failed (exit {self.proc.poll()}): {line[:200]!r}")
        return json.loads(self.result_path.read_text())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(10)


class OtherLoad:
    """CPU the machine spent outside the benchmark's own processes while it measured: on a shared machine, the
    figure that says whether a run can be trusted."""

    def __init__(self, pids: set[int]) -> None:
        self.pids = pids
        self.speed = stack.calibration_ms()
        self.start = self._now()

    def _now(self) -> tuple[float, float, float]:
        return time.monotonic(), stack.machine_busy_seconds(), sum(stack.cpu_seconds(p) for p in self.pids)

    def report(self) -> str:
        (t0, busy0, ours0), (t1, busy1, ours1) = self.start, self._now()
        other = max(0.0, (busy1 - busy0) - (ours1 - ours0))
        return (f"other processes used {other:.1f} CPU-s during the {t1 - t0:.0f} s of measurement "
                f"({100 * other / (t1 - t0):.0f}% of one core; the benchmark's own processes "
                f"{ours1 - ours0:.1f} CPU-s); machine speed: a fixed Python loop took {self.speed:.0f} ms before "
                f"and {stack.calibration_ms():.0f} ms after (lower is faster; compare runs by it)")


def kong_note() -> str:
    """Why `ours` goes through the harness here, and where the real-Kong comparison is."""
    import kong_bench

    kong, why = kong_bench.available()
    if kong is None:
        return (f"real Kong: skipped ({why}); `ours` is the plugin path through the Kong-side harness "
                "(tests/kong_harness.py), a Python stand-in for Kong's nginx whose own proxying is counted, so "
                "its latency is an upper bound of what the plugin adds inside a real Kong")
    return (f"real Kong: {kong} is driven by bench/kong_bench.py after this comparison (its own table, "
            "bench/results/kong-*.md); here `ours` is the plugin path through the Kong-side harness "
            "(tests/kong_harness.py)")


def versions() -> str:
    found = []
    for name in ("litellm", "aiohttp", "uvloop"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} not installed")
    return f"python {platform.python_version()}, " + ", ".join(found)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{platform.node()}: {model}, {os.cpu_count()} cores, Linux {platform.release()}"


def task(system: System, profile: str, mode: str, stream: bool, settings: Settings,
         rate: float = 0.0) -> dict[str, Any]:
    duration = max(settings.duration, settings.min_samples / rate) if rate else settings.duration
    return {"mode": mode, "url": system.url, "headers": system.headers, "stream": stream,
            "body": {"model": system.models[profile], "messages": MESSAGES}, "concurrency": CONCURRENCY[profile],
            "rate": rate, "warmup": settings.warmup, "duration": duration, "cpu_pids": list(system.pids.values()),
            "min_requests": settings.min_samples}


def measure_profile(profile: str, systems: list[System], loadgen: LoadGen,
                    settings: Settings) -> tuple[dict[tuple[str, str], Cell], dict[str, float]]:
    """Every cell of one latency profile, interleaved by round; and the rates derived from saturation."""
    cells: dict[tuple[str, str], Cell] = {}
    live = [s for s in systems if s.info.installed]

    def run(system: System, kind: str, mode: str, stream: bool, rate: float = 0.0) -> None:
        result = loadgen.run(task(system, profile, mode, stream, settings, rate))
        labels = {str(pid): label for label, pid in system.pids.items()}
        cell = cells.setdefault((system.info.name, kind), Cell())
        cell.add(result, labels)
        print(f"  {profile} {kind:13} {system.info.name:14} {result['requests'] / result['window']:8.1f} req/s"
              f"{'' if not result['errors'] else '  errors: ' + str(result['errors'])}", file=sys.stderr)

    for system in live:  # first requests pay for lazy imports and new connections: not measured
        for stream in (False, True):
            loadgen.run(dict(task(system, profile, "saturate", stream, settings), warmup=settings.prewarm,
                             duration=0.05))
    for _ in range(settings.rounds):
        for kind, stream in (("sat-json", False), ("sat-stream", True)):
            for system in live:
                run(system, kind, "saturate", stream)
    ours = live[1]
    rates = {"json": 0.5 * min(cells[(s.info.name, "sat-json")].rps for s in live),
             "stream": 0.5 * min(cells[(s.info.name, "sat-stream")].rps for s in live),
             "own": 0.5 * cells[(ours.info.name, "sat-json")].rps}
    rates = {k: max(1.0, v) for k, v in rates.items()}  # a system that barely answered still gets a load
    for _ in range(settings.rounds):
        for kind, stream, rate in (("rate-json", False, rates["json"]), ("rate-stream", True, rates["stream"])):
            for system in live:
                run(system, kind, "rate", stream, rate)
        for system in live[:2]:  # direct and ours at half of ours' saturation: the overhead target's load
            run(system, "own-rate-json", "rate", False, rates["own"])
    return cells, rates


def header(mode: str, settings: Settings | None, proxy: bool = True) -> list[str]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# bench/run {mode}: {now}", "", f"* machine: {machine()}", f"* versions: {versions()}",
             "* load generator: bench/loadgen.py, asyncio + aiohttp (uvloop when installed), in a process of its "
             "own, which shares the machine's cores with the systems under test; saturation: closed loop at "
             "concurrency " + ", ".join(f"{c} ({p})" for p, c in CONCURRENCY.items()) + "; latency: open loop, "
             "timed from each request's scheduled instant",
             "* mock provider: tests/mock_provider.py in its own process (uvloop), 50 content chunks per stream",
             f"* {kong_note()}"]
    if proxy:
        lines.append("* LiteLLM Proxy: `litellm --config … --num_workers 1` (uvicorn, uvloop), the same aliases → "
                     "`openai/<mock model>` at the mock with a dummy key; master key set (it refuses to start "
                     "without one; clients send it, as ours send key-auth's apikey), no database, spend logs and "
                     "updates off, LITELLM_LOG=ERROR (which also silences uvicorn's access log), "
                     "LITELLM_LOCAL_MODEL_COST_MAP=True")
    if settings is not None:
        lines.append(f"* mock latency profiles: {', '.join(settings.profiles)}; {settings.rounds} round(s) of "
                     f"interleaved cells, each {settings.warmup:g} s warm-up + {settings.duration:g} s measured"
                     + (f", longer if needed for {settings.min_samples} requests" if settings.min_samples
                        else ""))
    return [*lines, ""]


def start_systems(stack_: contextlib.ExitStack, smoke: bool) -> tuple[list[System], list[str]]:
    """The mock, then the proxy (which imports for seconds) and our plugin path side by side."""
    aliases = dict(ALIASES.values())
    mock = stack_.enter_context(stack.mock_provider())
    notes: list[str] = []
    proxy = None
    if stack.litellm_proxy_installed():
        proxy = stack_.enter_context(stack.litellm_proxy(aliases, mock))
    path = stack_.enter_context(stack.plugin_path(aliases, mock))
    installed = True
    if proxy is None:
        installed = False
    else:
        try:
            proxy.wait_ready()
        except stack.ProxyMissing as exc:
            notes.append(f"LiteLLM Proxy did not start: {str(exc).splitlines()[-1]}")
            installed = False
    if not installed and not smoke:
        raise SystemExit("LiteLLM Proxy is not installed: pip install -e '.[bench]' (only --smoke runs without it)")
    if not installed:
        notes.append("LiteLLM Proxy is not installed (the `bench` extra): its row is empty")
    systems = [direct_system(mock), ours_system(path),
               System(SystemInfo("LiteLLM Proxy", "proxy process", installed=installed),
                      f"{proxy.url}/v1/chat/completions" if proxy else "",
                      {"Authorization": f"Bearer {stack.PROXY_MASTER_KEY}"}, {p: a for p, (a, _) in ALIASES.items()},
                      {"proxy process": proxy.pid} if proxy and installed else {})]
    return systems, notes


def direct_system(mock: stack.MockProcess) -> System:
    return System(SystemInfo("direct", "mock provider"), f"{mock.openai_base}/chat/completions",
                  {"Authorization": f"Bearer {stack.PROVIDER_KEY}"}, {p: m for p, (_, m) in ALIASES.items()},
                  {"mock provider": mock.pid})


def ours_system(path: stack.PluginPath) -> System:
    """The harness runs in this process: its CPU is this process's (the orchestration idles meanwhile)."""
    return System(SystemInfo("ours", "plugin server", ("Kong-side harness",)), f"{path.url}/v1/chat/completions",
                  {"apikey": stack.CLIENT_KEY}, {p: a for p, (a, _) in ALIASES.items()},
                  {"plugin server": path.server.pid, "Kong-side harness": os.getpid()})


def bench(args: argparse.Namespace) -> int:
    settings = (Settings(1, 0.2, 0.5, 0.3, min_samples=5, profiles=("0 ms",)) if args.smoke
                else Settings(3, 1.0, 5.0, 2.0, min_samples=40))
    settings.rounds = args.rounds or settings.rounds
    settings.duration = args.duration or settings.duration
    started = time.monotonic()
    with contextlib.ExitStack() as processes:
        systems, notes = start_systems(processes, args.smoke)
        if systems[2].info.installed:  # a process that forks workers is measured whole
            systems[2].pids = {f"proxy process{'' if i == 0 else f' child {i}'}": pid
                               for i, pid in enumerate(stack.descendants(systems[2].pids["proxy process"]))}
        print(f"started in {time.monotonic() - started:.1f} s", file=sys.stderr)
        loadgen = LoadGen()
        tracked = {pid for system in systems for pid in system.pids.values()} | {loadgen.proc.pid, os.getpid()}
        noise = OtherLoad(tracked)
        try:
            results = {profile: measure_profile(profile, systems, loadgen, settings) for profile in settings.profiles}
            notes.append(noise.report())
        finally:
            loadgen.close()
        for system in systems:
            system.info.peak_rss = {label: stack.peak_rss_mb(pid) for label, pid in system.pids.items()}
    lines = header("--smoke" if args.smoke else "", settings) + [f"* note: {n}" for n in notes]
    for profile, (cells, rates) in results.items():
        lines += ["", *report.profile_table(profile, [s.info for s in systems], cells, rates, CONCURRENCY[profile])]
    lines += ["", "### Targets (issue 5), where we stand", "",
              *report.targets_table(report.targets({p: c for p, (c, _) in results.items()}, systems[1].info,
                                                   systems[2].info, systems[0].info, None)),
              "", f"Wall time {time.monotonic() - started:.0f} s."]
    write("bench-smoke" if args.smoke else "bench", lines)
    failed = [(name, kind) for profile, (cells, _) in results.items() for (name, kind), cell in cells.items()
              if cell.errors and name in ("direct", "ours")]
    if failed:
        print(f"errors on the measured paths: {failed}", file=sys.stderr)
    return 1 if failed else 0


def soak(args: argparse.Namespace) -> int:
    """Steady load against ours for --minutes, the plugin server's RSS sampled throughout."""
    seconds = args.minutes * 60
    interval = min(5.0, max(0.5, seconds / 60))
    samples: list[tuple[float, float]] = []
    with contextlib.ExitStack() as processes:
        mock = processes.enter_context(stack.mock_provider())
        ours = ours_system(processes.enter_context(stack.plugin_path(dict(ALIASES.values()), mock)))
        pid = ours.pids["plugin server"]
        load = dict(task(ours, "0 ms", "rate", False, Settings(1, 5.0, seconds, 0.0), args.soak_rate), stream_every=4)
        loadgen = LoadGen()
        noise = OtherLoad({*ours.pids.values(), mock.pid, loadgen.proc.pid})
        try:
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(loadgen.run, load)
                time.sleep(load["warmup"])
                t0 = time.monotonic()
                while not future.done():
                    samples.append((time.monotonic() - t0, stack.rss_mb(pid)))
                    wait([future], timeout=interval)
                result = future.result()
            other = noise.report()
        finally:
            loadgen.close()
        peak = stack.peak_rss_mb(pid)
    summary = report.soak_summary(samples)
    cpu = 1000 * result["cpu"][str(pid)] / result["requests"] if result["requests"] else math.nan
    info = SystemInfo("ours", "plugin server", peak_rss={"plugin server": peak})
    verdict = report.targets({}, info, info, info, summary)[-1]
    by_minute = [min(samples, key=lambda sample: abs(sample[0] - 60 * m))
                 for m in range(int(samples[-1][0] // 60) + 1)]
    by_minute += [samples[-1]] if by_minute[-1] is not samples[-1] else []
    lines = [*header("--soak", None, proxy=False),
             f"Steady open-loop load against ours: {args.soak_rate:g} req/s, one request in four streamed, mock "
             f"latency 0 ms, {args.minutes:g} min after 5 s of warm-up; the plugin server's RSS (VmRSS) sampled "
             f"every {interval:g} s. {result['requests']} requests, {result['errors']} errors, plugin-server CPU "
             f"{report.fmt(cpu, 2)} ms per request; peak RSS (VmHWM) {peak:.1f} MB.", "",
             "| RSS start MB | RSS end MB | RSS max MB | slope MB/min | target | status |", "|---|---|---|---|---|---|",
             f"| {summary['start']:.1f} | {summary['end']:.1f} | {summary['max']:.1f} | {summary['slope']:.3f} | "
             f"{verdict.target} (fitted growth ≤ {report.SOAK_TOLERANCE_MB:g} MB) | {verdict.status} |", "",
             "RSS by minute: " + ", ".join(f"{t / 60:.1f} min {v:.1f} MB" for t, v in by_minute), "",
             f"Note: {other}."]
    write("soak", lines)
    return 1 if result["errors"] else 0


def write(name: str, lines: list[str]) -> None:
    """Print the report and keep it in bench/results/ (gitignored)."""
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(text)
    print(f"written to {path.relative_to(BENCH.parent)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds per profile: CI's check that it runs")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --smoke 1)")
    parser.add_argument("--duration", type=float, help="seconds measured per cell (default 5; --smoke 0.6)")
    parser.add_argument("--kong", action="store_true", help="only the real-Kong comparison (bench/kong_bench.py)")
    parser.add_argument("--no-kong", action="store_true", help="skip the real-Kong comparison even if Kong is found")
    parser.add_argument("--mock-latency", type=int, default=0,
                        help="real-Kong comparison: the mock's ms before a JSON answer (default 0; 60: a provider's)")
    parser.add_argument("--soak", action="store_true", help="steady load against ours, RSS sampled")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    parser.add_argument("--soak-rate", type=float, default=100.0, help="requests/s during the soak (default 100)")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that every server started (LiteLLM Proxy included) is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.soak:
        return soak(args)
    import kong_bench  # when a Kong is found (KONG_BIN or PATH), the same paths inside it, side by side

    status = 0 if args.kong else bench(args)
    if not args.no_kong:
        status |= kong_bench.run(args.smoke, args.rounds, args.duration, latency_ms=args.mock_latency)
    return status


if __name__ == "__main__":
    sys.exit(main())
