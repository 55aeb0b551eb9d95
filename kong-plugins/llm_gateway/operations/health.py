"""Liveness and readiness of the plugin server, answered next to ``/metrics`` from the first moments of the process.

Kong starts the plugin server and does not wait for it; LiteLLM then takes seconds of CPU to import. An
orchestrator (Docker's ``HEALTHCHECK``, a Kubernetes probe, a load balancer) must be able to tell "still
starting" from "serving" from "stuck", so this module imports nothing heavy: ``cli.serve`` starts the HTTP
server (a thread, see ``metrics.start_metrics_server``) before the import and reports each phase here.

* **Liveness** (``/health/live``, also ``/livez``): the process's event loop answers. The loop stamps a
  heartbeat every second (``watch``); a stamp older than ``stale_after`` seconds is 503. While the server is
  still starting (the loop is busy importing) liveness is 200 for ``startup_grace`` seconds, then 503.
* **Readiness** (``/health/ready``, also ``/readyz``): LiteLLM imported, provider paths warmed up, Kong's
  socket and the listener accepting, the loop alive, not stepped aside for a successor (kong reload), and
  every Redis that a route's fail-closed budgets depend on answered its last PING (probed every
  ``PROBE_INTERVAL_S`` by ``watch``, at the route's own ``redis.timeout``). Routes are known once Kong has
  started their plugin instances (on their first request), so a Redis only counts from then on.
  With several processes, the master's readiness also needs every worker serving (``Health.extra``, from
  ``kong/workers.py``).

Both answer JSON: ``{"status": "ok"|"starting"|"failing", "phase": ..., "pid": ..., "checks": {...}}`` (the
pid tells which plugin server answered, across a kong reload's hand-over). Check names
carry a Redis's host, port and database only, never its URL (which may carry a password).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("llm_gateway.health")

PHASES = ("starting", "importing", "warming_up", "serving", "stepped_aside", "stopping")
HEARTBEAT_S = 1.0
PROBE_INTERVAL_S = 2.0
LIVE_PATHS = frozenset({"/health/live", "/livez"})
READY_PATHS = frozenset({"/health/ready", "/readyz"})


def redis_name(url: str) -> str:
    """A Redis named by host, port and database only: what a health check may show of its URL."""
    try:
        parsed = urllib.parse.urlsplit(url)
        host, port = parsed.hostname or "?", parsed.port or 6379
    except ValueError:
        return "redis ?"
    db = parsed.path.lstrip("/") or "0"
    return f"redis {host}:{port}/{db}"


@dataclass
class Probe:
    ok: bool
    at: float  # time.monotonic() of the answer
    detail: str = ""


@dataclass
class Health:
    """What the health endpoints report. Written by the event loop, read by the HTTP server's threads."""

    stale_after: float = 10.0
    startup_grace: float = 120.0
    started: float = field(default_factory=time.monotonic)
    phase: str = "starting"
    heartbeat: float | None = None  # time.monotonic() of the loop's last stamp
    redis: dict[str, Probe] = field(default_factory=dict)
    # more readiness checks, read from the HTTP server's threads: the worker processes (kong/workers.py)
    extra: Callable[[], dict[str, dict[str, Any]]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def enter(self, phase: str) -> None:
        assert phase in PHASES, phase
        self.phase = phase
        log.debug("health phase: %s", phase)

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def set_redis(self, probes: dict[str, Probe]) -> None:
        with self._lock:
            self.redis = probes

    # -- answers ---------------------------------------------------------------------------------------------
    def _loop_check(self, now: float) -> tuple[bool, str]:
        if self.heartbeat is None:
            if now - self.started <= self.startup_grace:
                return True, f"starting for {now - self.started:.1f} s"
            return False, f"not serving after {now - self.started:.0f} s (startup grace {self.startup_grace:g} s)"
        age = now - self.heartbeat
        if age > self.stale_after:
            return False, f"event loop silent for {age:.1f} s (limit {self.stale_after:g} s)"
        return True, f"heartbeat {age:.1f} s ago"

    def liveness(self) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        ok, detail = self._loop_check(now)
        starting = self.heartbeat is None and ok
        status = "starting" if starting else "ok" if ok else "failing"
        return (200 if ok else 503), {"status": status, "phase": self.phase, "pid": os.getpid(),
                                      "checks": {"event_loop": {"ok": ok, "detail": detail}}}

    def readiness(self) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        checks: dict[str, dict[str, Any]] = {}
        serving = self.phase == "serving"
        checks["serving"] = {"ok": serving, "detail": self.phase}
        loop_ok, detail = self._loop_check(now)
        checks["event_loop"] = {"ok": loop_ok and self.heartbeat is not None, "detail": detail}
        with self._lock:
            probes = dict(self.redis)
        for name, probe in sorted(probes.items()):
            fresh = now - probe.at <= max(3 * PROBE_INTERVAL_S, self.stale_after)
            checks[name] = {"ok": probe.ok and fresh,
                            "detail": probe.detail if fresh else f"last probe {now - probe.at:.0f} s ago"}
        if self.extra is not None:
            try:
                checks.update(self.extra())
            except Exception as exc:  # a report that fails is not ready, and never a 500
                checks["processes"] = {"ok": False, "detail": f"unknown ({type(exc).__name__})"}
        ok = all(check["ok"] for check in checks.values())
        status = "ok" if ok else "starting" if self.phase in ("starting", "importing", "warming_up") else "failing"
        return (200 if ok else 503), {"status": status, "phase": self.phase, "pid": os.getpid(), "checks": checks}

    def answer(self, path: str) -> tuple[int, bytes] | None:
        """(status, JSON body) for a health path; None for any other path."""
        if path in LIVE_PATHS:
            status, body = self.liveness()
        elif path in READY_PATHS:
            status, body = self.readiness()
        else:
            return None
        return status, json.dumps(body, separators=(",", ":")).encode()


# -- the event loop's side ---------------------------------------------------------------------------------------
async def _ping(client: Any, limit_s: float) -> Probe:
    try:
        async with asyncio.timeout(limit_s):
            await client.ping()
        return Probe(True, time.monotonic(), "PONG")
    except Exception as exc:  # the reason in a word: never the URL or a password
        return Probe(False, time.monotonic(), f"unreachable ({type(exc).__name__})")


async def probe_redis(targets: Iterable[tuple[str, Any, float]]) -> dict[str, Probe]:
    """PING each (name, redis.asyncio client, timeout) at once; their answers by name."""
    targets = list(targets)
    results = await asyncio.gather(*(_ping(client, timeout) for _, client, timeout in targets))
    return {name: probe for (name, _, _), probe in zip(targets, results, strict=True)}


async def watch(health: Health, redis_targets: Callable[[], Iterable[tuple[str, Any, float]]]) -> None:
    """Run for the process's life: the heartbeat every second, and the Redis probes every PROBE_INTERVAL_S
    (in a task of their own, so a slow Redis never delays the heartbeat)."""
    probing: asyncio.Task | None = None
    last_probe = 0.0

    async def probe() -> None:
        health.set_redis(await probe_redis(redis_targets()))

    try:
        while True:
            health.beat()
            now = time.monotonic()
            if now - last_probe >= PROBE_INTERVAL_S and (probing is None or probing.done()):
                last_probe = now
                probing = asyncio.create_task(probe())
            await asyncio.sleep(HEARTBEAT_S)
    finally:
        if probing is not None and not probing.done():
            probing.cancel()
            with contextlib.suppress(BaseException):
                await probing


def fail_closed_redis(runtime: Any) -> list[tuple[str, Any, float]]:
    """(name, client, timeout) of every Redis a known route's budgets depend on with ``budget_fail_open`` off:
    when one is down those routes answer 503, so this server is not ready."""
    targets: dict[str, tuple[str, Any, float]] = {}
    for config in runtime.registry.configs():
        settings = config.redis
        if settings is None or not config.budgets or config.budget_fail_open:
            continue
        name = redis_name(settings.url)
        if name not in targets:
            try:
                targets[name] = (name, runtime.redis(settings), settings.timeout)
            except Exception as exc:  # a URL redis-py refuses: the budget checks will fail the same way
                log.warning("cannot probe %s: %s", name, type(exc).__name__)
    return list(targets.values())
