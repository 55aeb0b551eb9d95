"""bench/run's results: the cells it measures, the markdown tables it prints, and the targets of issue 5.

Kept apart from the orchestration so that what a figure means is written next to the code that computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

KINDS = ("sat-json", "sat-stream", "rate-json", "rate-stream", "own-rate-json")


@dataclass
class Cell:
    """One (profile, system, kind) over all rounds: sums and pooled samples."""

    requests: int = 0
    errors: int = 0
    first_error: str | None = None
    window: float = 0.0
    rps_rounds: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process label → CPU seconds over the windows
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)

    def add(self, result: dict[str, Any], labels: dict[str, str]) -> None:
        """Fold one loadgen result in; `labels` maps the pids it measured to process labels."""
        self.requests += result["requests"]
        self.errors += result["errors"]
        self.first_error = self.first_error or result["first_error"]
        self.window += result["window"]
        self.rps_rounds.append(result["requests"] / result["window"] if result["window"] else 0.0)
        for pid, seconds in result["cpu"].items():
            self.cpu[labels[pid]] = self.cpu.get(labels[pid], 0.0) + seconds
        for name in ("latency", "ttft", "total", "chunks"):
            getattr(self, name).extend(result[name])

    @property
    def rps(self) -> float:
        """Median over rounds of the requests completed per second of window."""
        ordered = sorted(self.rps_rounds)
        return ordered[len(ordered) // 2] if ordered else math.nan

    def cpu_ms_per_request(self, label: str) -> float:
        return 1000 * self.cpu.get(label, math.nan) / self.requests if self.requests else math.nan

    def cpu_ms_per_chunk(self, label: str) -> float:
        chunks = sum(self.chunks)
        return 1000 * self.cpu.get(label, math.nan) / chunks if chunks else math.nan


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of samples, NaN without any."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fmt(value: float, digits: int = 1) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def pair(values: list[float], base: list[float] | None = None, digits: int = 1) -> str:
    """'p50 / p99' of samples, or of the difference from a base's p50 / p99."""
    p50, p99 = pct(values, 0.5), pct(values, 0.99)
    if base is not None:
        p50, p99 = p50 - pct(base, 0.5), p99 - pct(base, 0.99)
    return f"{fmt(p50, digits)} / {fmt(p99, digits)}"


@dataclass
class SystemInfo:
    """How a system appears in the tables: its name, the label of its server process, its extra processes."""

    name: str
    server: str  # the process whose CPU and RSS are "the server's"
    extra: tuple[str, ...] = ()  # other processes of the path measured too (the harness)
    installed: bool = True
    peak_rss: dict[str, float] = field(default_factory=dict)


def profile_table(profile: str, systems: list[SystemInfo], cells: dict[tuple[str, str], Cell],
                  rates: dict[str, float], concurrency: int) -> list[str]:
    """The main table of one latency profile."""
    lines = [f"### mock latency {profile}",
             "",
             f"Saturation: closed loop, concurrency {concurrency}. Latency: open loop at {fmt(rates['json'], 0)} "
             f"req/s (half of the slowest system's saturated JSON throughput); streams open loop at "
             f"{fmt(rates['stream'], 0)} streams/s (half of the slowest saturated stream throughput). "
             "Overheads are against `direct` in the same run. CPU is the server process's, over the measured "
             "windows only.",
             "",
             "| system | req/s saturated | req per server CPU-s | latency p50 / p99 ms | overhead p50 / p99 ms "
             "| streams/s saturated | TTFT p50 / p99 ms | TTFT overhead p50 / p99 ms | stream total p50 / p99 ms "
             "| server CPU s per 1,000 req (saturated / at rate) | CPU ms / stream chunk | peak RSS MB | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    direct = systems[0].name
    for system in systems:
        if not system.installed:
            lines.append(f"| {system.name} | not installed |" + " |" * 11)
            continue
        cell = {kind: cells.get((system.name, kind), Cell()) for kind in KINDS}
        base = {kind: cells.get((direct, kind), Cell()) for kind in KINDS}
        own = system.name == direct
        sat, rate_json, rate_stream = cell["sat-json"], cell["rate-json"], cell["rate-stream"]
        per_cpu = sat.requests / sat.cpu[system.server] if sat.cpu.get(system.server) else math.nan
        errors = sum(c.errors for c in cell.values())
        lines.append(" | ".join([
            f"| {system.name}", fmt(sat.rps, 0), fmt(per_cpu, 0), pair(rate_json.latency),
            "–" if own else pair(rate_json.latency, base["rate-json"].latency),
            fmt(cell["sat-stream"].rps, 0), pair(rate_stream.ttft),
            "–" if own else pair(rate_stream.ttft, base["rate-stream"].ttft), pair(rate_stream.total),
            f"{fmt(sat.cpu_ms_per_request(system.server), 2)} / "
            f"{fmt(rate_json.cpu_ms_per_request(system.server), 2)}",
            fmt(rate_stream.cpu_ms_per_chunk(system.server), 3), fmt(system.peak_rss.get(system.server, math.nan), 0),
            str(errors) + (f" ({_short(next(c.first_error for c in cell.values() if c.first_error))})"
                           if errors else "") + " |"]))
        for label in system.extra:
            lines.append(" | ".join([
                f"| ↳ {label}", "", fmt(sat.requests / sat.cpu[label] if sat.cpu.get(label) else math.nan, 0),
                "", "", "", "", "", "",
                f"{fmt(sat.cpu_ms_per_request(label), 2)} / {fmt(rate_json.cpu_ms_per_request(label), 2)}",
                fmt(rate_stream.cpu_ms_per_chunk(label), 3), "", " |"]))
    return lines


def _short(message: str) -> str:
    return message.replace("|", "/").replace("\n", " ")[:80]


@dataclass
class Verdict:
    target: str
    measured: str
    status: str


def check(value: float, limit: float, unit: str, higher_is_better: bool = False) -> str:
    """'met' or 'missed by …' (NaN: 'not measured')."""
    if math.isnan(value):
        return "not measured"
    value = round(value, 2)  # as displayed
    ok = value >= limit if higher_is_better else value <= limit
    if ok:
        return "met"
    gap = (limit / value if higher_is_better and value else value - limit)
    return f"missed by {gap:.1f}×" if higher_is_better else f"missed by {gap:.2f} {unit}"


def targets(profiles: dict[str, dict[tuple[str, str], Cell]], ours: SystemInfo, proxy: SystemInfo,
            direct: SystemInfo, soak: dict[str, float] | None) -> list[Verdict]:
    """Where we stand against each target of issue 5, per latency profile. Nothing is asserted."""
    verdicts = []
    server = ours.server
    for profile, cells in profiles.items():
        def get(system: SystemInfo, kind: str, _cells: dict = cells) -> Cell:
            return _cells.get((system.name, kind), Cell())

        o_sat, p_sat = get(ours, "sat-json"), get(proxy, "sat-json")
        o_core = o_sat.requests / o_sat.cpu[server] if o_sat.cpu.get(server) else math.nan
        p_core = (p_sat.requests / p_sat.cpu[proxy.server]
                  if proxy.installed and p_sat.cpu.get(proxy.server) else math.nan)
        ratio = o_core / p_core if p_core else math.nan
        raw = o_sat.rps / p_sat.rps if proxy.installed and p_sat.rps else math.nan
        verdicts.append(Verdict(
            f"{profile}: throughput per core ≥ 5× LiteLLM Proxy's",
            f"{fmt(ratio, 1)}× per server CPU-second ({fmt(o_core, 0)} vs {fmt(p_core, 0)} req/CPU-s); "
            f"raw saturated req/s {fmt(raw, 1)}× ({fmt(o_sat.rps, 0)} vs {fmt(p_sat.rps, 0)})",
            check(ratio, 5, "", higher_is_better=True) if proxy.installed else "LiteLLM Proxy not installed"))
        # CPU per request falls as load rises (wake-ups and syscalls are shared by more requests): all three loads
        cpu_rate = get(ours, "rate-json").cpu_ms_per_request(server)
        cpu_half = get(ours, "own-rate-json").cpu_ms_per_request(server)
        cpu_sat = o_sat.cpu_ms_per_request(server)
        loads = {"at the low common rate": cpu_rate, "at half of saturation": cpu_half, "saturated": cpu_sat}
        verdicts.append(Verdict(f"{profile}: plugin-server CPU per request ≤ 2 ms",
                                "; ".join(f"{fmt(v, 2)} ms {k}" for k, v in loads.items()),
                                "; ".join(f"{check(v, 2, 'ms')} {k}" for k, v in loads.items())))
        stream = get(ours, "rate-stream")
        per_chunk = stream.cpu_ms_per_chunk(server)
        chunks = sum(stream.chunks) / len(stream.chunks) if stream.chunks else math.nan
        marginal = (1000 * stream.cpu.get(server, math.nan) / stream.requests - cpu_rate) / chunks \
            if stream.requests else math.nan
        verdicts.append(Verdict(f"{profile}: streaming CPU ≤ 0.1 ms per chunk",
                                f"{fmt(per_chunk, 3)} ms all-in ({fmt(chunks, 0)} chunks per stream); "
                                f"{fmt(marginal, 3)} ms beyond a JSON request's cost",
                                check(per_chunk, 0.1, "ms")))
        own, base = get(ours, "own-rate-json").latency, get(direct, "own-rate-json").latency
        o50, o99 = pct(own, 0.5) - pct(base, 0.5), pct(own, 0.99) - pct(base, 0.99)
        rate = get(ours, "own-rate-json").requests / get(ours, "own-rate-json").window \
            if get(ours, "own-rate-json").window else math.nan
        verdicts.append(Verdict(f"{profile}: overhead over direct ≤ 2 ms p50 at half of saturation",
                                f"{fmt(o50, 2)} ms at {fmt(rate, 0)} req/s (half of ours' saturation)",
                                check(o50, 2, "ms")))
        verdicts.append(Verdict(f"{profile}: overhead over direct ≤ 10 ms p99 at half of saturation",
                                f"{fmt(o99, 2)} ms at {fmt(rate, 0)} req/s", check(o99, 10, "ms")))
        ttft, ttft_base = get(ours, "rate-stream").ttft, get(direct, "rate-stream").ttft
        t50, t99 = pct(ttft, 0.5) - pct(ttft_base, 0.5), pct(ttft, 0.99) - pct(ttft_base, 0.99)
        verdicts.append(Verdict(f"{profile}: streaming TTFT overhead ≤ 5 ms",
                                f"p50 {fmt(t50, 2)} ms, p99 {fmt(t99, 2)} ms", check(t50, 5, "ms")))
    rss = ours.peak_rss.get(server, math.nan)
    verdicts.append(Verdict("RSS per plugin-server process ≤ 300 MB", f"peak (VmHWM) {fmt(rss, 0)} MB",
                            check(rss, 300, "MB")))
    if soak is None:
        verdicts.append(Verdict("no RSS growth over a 10-minute soak", "not part of this run",
                                "not measured: `bench/run --soak`"))
    else:
        growth = max(0.0, soak["slope"]) * soak["minutes"]
        verdicts.append(Verdict(
            f"no RSS growth over a {fmt(soak['minutes'], 1)}-minute soak",
            f"start {fmt(soak['start'], 1)}, end {fmt(soak['end'], 1)}, max {fmt(soak['max'], 1)} MB; "
            f"slope {fmt(soak['slope'], 3)} MB/min (least squares)",
            "met" if growth <= SOAK_TOLERANCE_MB else f"missed: {growth:.1f} MB fitted growth"))
    return verdicts


SOAK_TOLERANCE_MB = 5.0  # fitted growth over the whole soak below this counts as "no growth" (allocator noise)


def targets_table(verdicts: list[Verdict]) -> list[str]:
    lines = ["| target | measured | status |", "|---|---|---|"]
    lines += [f"| {v.target} | {v.measured} | {v.status} |" for v in verdicts]
    return lines


def soak_summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    """start / end / max RSS (MB) and the least-squares slope (MB per minute) of (seconds, MB) samples."""
    times, values = [t / 60 for t, _ in samples], [v for _, v in samples]
    mean_t, mean_v = sum(times) / len(times), sum(values) / len(values)
    spread = sum((t - mean_t) ** 2 for t in times)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True)) / spread if spread else 0.0
    return {"start": values[0], "end": values[-1], "max": max(values), "slope": slope,
            "minutes": times[-1] - times[0]}
