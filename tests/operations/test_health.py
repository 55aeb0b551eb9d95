"""Liveness and readiness of real plugin server processes, on the metrics port (``operations/health.py``).

Each test starts servers of its own: what is tested is the process's life (starting, a stuck loop, a Redis that
goes away, a successor taking over on kong reload), which the session's server must not go through.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from conftest import ALICE_KEY, REDIS_PREFIX, free_port, route_to
from kong_harness import PLUGINS_DIR, PluginServerProcess, start_plugin_server

FAULTS_DIR = Path(__file__).resolve().parents[1] / "faults"
DEMO = {"name": "demo", "deployments": [{"model": "demo/echo"}]}
HELLO = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}
REDIS_PASSWORD = "health-check-must-not-show-this"


def _health(metrics: str, which: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"http://{metrics}/health/{which}", timeout=5)
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json()


def _spawn(tmp_path: Path, name: str, socket_path: str, listen: str, demo: str, metrics: str,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    full_env = {**os.environ, "PYTHONPATH": str(PLUGINS_DIR), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "llm_gateway", "serve", "--socket", socket_path, "--listen",
                             listen, "--demo-listen", demo, "--metrics-listen", metrics], env=full_env,
                            stdin=subprocess.DEVNULL, stderr=open(log, "wb"))
    return proc, log


def _wait(predicate: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _server(tmp_path: Path, env: dict[str, str] | None = None) -> PluginServerProcess:
    metrics = f"127.0.0.1:{free_port()}"
    server = start_plugin_server(str(tmp_path / "llm-gateway.sock"), f"127.0.0.1:{free_port()}",
                                 f"127.0.0.1:{free_port()}", env={"LLM_GATEWAY_METRICS_LISTEN": metrics, **(env or {})})
    server.metrics = metrics  # type: ignore[attr-defined]
    return server


def test_health_answers_from_the_first_moments_and_readiness_waits_for_litellm(tmp_path: Path) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    proc, log = _spawn(tmp_path, "server", str(tmp_path / "s.sock"), f"127.0.0.1:{free_port()}",
                       f"127.0.0.1:{free_port()}", metrics)
    seen: list[tuple[int, dict, int, dict, str]] = []
    try:
        deadline = time.monotonic() + 90
        while not seen or seen[-1][2] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, (seen[-3:], log.read_text()[-2000:])
            text = log.read_text()
            try:
                live, ready = _health(metrics, "live"), _health(metrics, "ready")
            except httpx.HTTPError:
                time.sleep(0.01)
                continue
            seen.append((*live, *ready, text))
        before_import = [s for s in seen if "LiteLLM imported" not in s[4]]
        assert before_import, "health did not answer before LiteLLM was imported"
        for live_status, live_body, ready_status, ready_body, _ in before_import:
            assert live_status == 200 and live_body["status"] == "starting"
            assert ready_status == 503 and ready_body["status"] == "starting"
            assert ready_body["phase"] in ("importing", "warming_up") and not ready_body["checks"]["serving"]["ok"]
        assert all(s[0] == 200 for s in seen), "liveness failed while the server was starting"
        ready = seen[-1][3]
        assert ready["status"] == "ok" and ready["phase"] == "serving" and ready["pid"] == proc.pid
        assert ready["checks"]["event_loop"]["ok"] and ready["checks"]["serving"]["ok"]
        assert "plugin server ready" in log.read_text()
        live = _health(metrics, "live")
        assert live[0] == 200 and live[1]["status"] == "ok"
        assert "# HELP llm_gateway_requests" in httpx.get(f"http://{metrics}/metrics", timeout=5).text
        for alias in ("/livez", "/readyz"):
            assert httpx.get(f"http://{metrics}{alias}", timeout=5).status_code == 200
    finally:
        proc.kill()
        proc.wait()


def _budgeted(redis_url: str, *, fail_open: bool = False) -> dict[str, Any]:
    return {"models": [DEMO], "budget_fail_open": fail_open,
            "budgets": [{"name": "hourly", "window": "hour", "tokens": 1_000_000}],
            "redis": {"url": redis_url, "key_prefix": REDIS_PREFIX + "health:", "timeout": 0.2}}


def _post(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=HELLO, headers={"apikey": ALICE_KEY}, timeout=30)


def test_readiness_fails_while_a_redis_that_fail_closed_budgets_need_is_unreachable(tmp_path: Path) -> None:
    server = _server(tmp_path)
    metrics = server.metrics  # type: ignore[attr-defined]
    try:
        with route_to(server, _budgeted("redis://127.0.0.1:6379/15")) as kong:
            assert _post(kong.url).status_code == 200
        ready = _wait(lambda: (r := _health(metrics, "ready"))[0] == 200
                      and "redis 127.0.0.1:6379/15" in r[1]["checks"] and r, "the live Redis was never probed")
        assert ready[1]["checks"]["redis 127.0.0.1:6379/15"]["ok"]
        gone_but_open = free_port()
        with route_to(server, _budgeted(f"redis://127.0.0.1:{gone_but_open}/15", fail_open=True)) as kong:
            assert _post(kong.url).status_code == 200  # budgets fail open: this Redis does not decide readiness
        gone = free_port()
        with route_to(server, _budgeted(f"redis://:{REDIS_PASSWORD}@127.0.0.1:{gone}/15")) as kong:
            refused = _post(kong.url)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "budget_store_unavailable"
        name = f"redis 127.0.0.1:{gone}/15"
        _, body = _wait(lambda: (r := _health(metrics, "ready"))[0] == 503 and name in r[1]["checks"] and r,
                             "readiness never noticed the unreachable Redis", timeout=15)
        assert body["status"] == "failing" and not body["checks"][name]["ok"]
        assert "unreachable" in body["checks"][name]["detail"]
        assert body["checks"]["redis 127.0.0.1:6379/15"]["ok"]
        assert f"redis 127.0.0.1:{gone_but_open}/15" not in body["checks"]
        raw = httpx.get(f"http://{metrics}/health/ready", timeout=5).text
        assert REDIS_PASSWORD not in raw and "redis://" not in raw
        assert _health(metrics, "live")[0] == 200  # the process itself is fine: do not restart it
    finally:
        server.stop()


def test_liveness_fails_while_the_event_loop_is_stuck_and_recovers_after(tmp_path: Path) -> None:
    server = _server(tmp_path, env={"LLM_GATEWAY_TEST_FAULTS": "1", "LLM_GATEWAY_LIVENESS_STALE_S": "1",
                                    "PYTHONPATH": os.pathsep.join([str(FAULTS_DIR), str(PLUGINS_DIR)])})
    metrics = server.metrics  # type: ignore[attr-defined]
    try:
        assert _health(metrics, "live")[0] == 200
        with route_to(server, {"models": [DEMO]}) as kong:
            stuck = {**HELLO, "messages": [{"role": "user", "content": "FAULT:block-loop-4"}]}
            blocked = threading.Thread(target=lambda: httpx.post(
                f"{kong.url}/v1/chat/completions", json=stuck, headers={"apikey": ALICE_KEY}, timeout=30))
            blocked.start()
            _, body = _wait(lambda: (r := _health(metrics, "live"))[0] == 503 and r,
                                 "liveness never noticed the stuck loop", timeout=4)
            assert body["status"] == "failing" and "event loop silent" in body["checks"]["event_loop"]["detail"]
            assert _health(metrics, "ready")[0] == 503
            blocked.join(30)
        _wait(lambda: _health(metrics, "live")[0] == 200, "liveness did not recover", timeout=5)
        _wait(lambda: _health(metrics, "ready")[0] == 200, "readiness did not recover", timeout=5)
    finally:
        server.stop()


def test_a_successor_takes_over_the_health_port_on_kong_reload(tmp_path: Path) -> None:
    """The old server answers health (ready) while the new one imports; once the new one is ready, the port is
    the new one's, and the old one, finishing its requests, no longer claims it."""
    ports = (str(tmp_path / "s.sock"), f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    metrics = f"127.0.0.1:{free_port()}"
    old, old_log = _spawn(tmp_path, "old", *ports, metrics)
    new = None
    try:
        _wait(lambda: _health(metrics, "ready")[0] == 200, "the first server never got ready", timeout=90)
        new, new_log = _spawn(tmp_path, "new", *ports, metrics)
        answers: list[tuple[int, int, str]] = []
        deadline = time.monotonic() + 90
        while not answers or answers[-1][1] != new.pid or answers[-1][0] != 200:
            assert time.monotonic() < deadline, (answers[-5:], new_log.read_text()[-2000:])
            try:
                status, body = _health(metrics, "ready")
                answers.append((status, body["pid"], body["phase"]))
            except httpx.HTTPError:
                answers.append((0, 0, "refused"))
            time.sleep(0.02)
        assert old.poll() is None, "the old server must finish its requests, not die"
        from_old = [a for a in answers if a[1] == old.pid]
        assert from_old and all(a[0] == 200 and a[2] == "serving" for a in from_old), from_old[-5:]
        switch = answers.index(next(a for a in answers if a[1] == new.pid))
        assert not [a for a in answers[switch:] if a[1] == old.pid], "the old server still answered after"
        assert sum(1 for a in answers if a[0] == 0) * 0.02 < 2, "the port was unanswered for long"
        assert "takes over" in old_log.read_text()
    finally:
        for proc in (old, new):
            if proc is not None:
                proc.kill()
                proc.wait()
