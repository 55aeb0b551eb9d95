"""The plugin server on several processes (kong/workers.py), through its real socket and the Kong harness: requests
spread over every process, a ticket is good only at the process it names and only once, a freshly started
instance is known to the workers before Kong can use it, a killed worker comes back, memory budgets stay exact,
/metrics sums every process, and the whole group stops together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import PROVIDER_KEY, free_port
from kong_harness import KongHarness, KongRPC, PluginServerProcess, start_plugin_server
from llm_gateway.kong.workers import pinned_slot
from mock_provider import MockProvider

PROCESS = "X-LLM-Gateway-Process"
TICKET = "X-LLM-Gateway-Ticket"
CAROL_KEY, DAVE_KEY = "test-key-carol-" + secrets.token_hex(6), "test-key-dave-" + secrets.token_hex(6)
HELLO = [{"role": "user", "content": "hello"}]


def _consumer_on(slot: int, name: str) -> dict[str, Any]:
    """A consumer whose memory budgets live in process ``slot`` of two."""
    while True:
        cid = str(uuid.uuid4())
        if pinned_slot(cid, 2) == slot:
            return {"id": cid, "username": name}


CAROL, DAVE = _consumer_on(0, "carol"), _consumer_on(1, "dave")  # the master's, the worker's
CONSUMERS = {CAROL_KEY: CAROL, DAVE_KEY: DAVE}


def _start(tmp: Path, processes: int = 2, **env: str) -> PluginServerProcess:
    metrics = f"127.0.0.1:{free_port()}"
    server = start_plugin_server(str(tmp / "llm-gateway.sock"), f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                 env={"MOCK_PROVIDER_KEY": PROVIDER_KEY, "LLM_GATEWAY_PROCESSES": str(processes),
                                      "LLM_GATEWAY_METRICS_LISTEN": metrics, **env})
    server.metrics = metrics  # type: ignore[attr-defined]
    return server


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginServerProcess]:
    server = _start(tmp_path_factory.mktemp("two-processes"))
    yield server
    server.stop()


def processes(server: PluginServerProcess) -> list[dict[str, Any]]:
    return KongRPC(server.socket_path).call("plugin.GetStatus")["Processes"]


def wait_for(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def config(mock: MockProvider, *aliases: str, **extra: Any) -> dict[str, Any]:
    models = [{"name": "demo", "deployments": [{"model": "demo/echo"}]},
              {"name": "gpt", "deployments": [{"model": "openai/mock-gpt-words-5", "api_base": mock.openai_base,
                                               "api_key_env": "MOCK_PROVIDER_KEY"}]}]
    models += [{"name": name, "deployments": [{"model": "demo/echo"}]} for name in aliases]
    return {"models": models, **extra}


def route(server: PluginServerProcess, plugin_config: dict[str, Any]) -> KongHarness:
    return KongHarness(server.socket_path, plugin_config, CONSUMERS, service_url=f"http://{server.listen}")


def post(kong: KongHarness, model: str = "demo", key: str = CAROL_KEY, **body: Any) -> httpx.Response:
    return httpx.post(f"{kong.url}/v1/chat/completions", json={"model": model, "messages": HELLO, **body},
                      headers={"apikey": key}, timeout=30)


def test_requests_spread_over_every_process(two: PluginServerProcess, mock_provider: MockProvider) -> None:
    rows = processes(two)
    assert [r["Role"] for r in rows] == ["master", "worker"] and all(r["Serving"] for r in rows)
    assert rows[0]["Pid"] == two.pid and rows[1]["Pid"] != two.pid
    with route(two, config(mock_provider)) as kong:
        served = [post(kong, model) for model in ("demo", "gpt") * 4]
    assert [r.status_code for r in served] == [200] * 8, served[0].text
    assert {int(r.headers[PROCESS]) for r in served} == {r["Pid"] for r in rows}


# -- tickets -------------------------------------------------------------------------------------------------
def _run_access(rpc: KongRPC, iid: int, body: bytes, consumer: dict[str, Any]) -> tuple[str, tuple | None]:
    """Kong's bridge loop by hand: (the ticket, the set_target arguments or None)."""
    answers = {"kong.request.get_raw_body": body, "kong.client.get_consumer": consumer,
               "kong.router.get_service": {"read_timeout": 60000}}
    steps = {"kong.client.get_consumer": "plugin.StepConsumer", "kong.router.get_service": "plugin.StepService"}
    reply = rpc.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
    ticket, target = "", None
    while reply["Data"] != "ret":
        call = reply["Data"]
        if call["Method"] == "kong.service.set_target":
            target = tuple(call["Args"])
        if call["Method"] == "kong.service.request.set_header" and call["Args"][0] == TICKET:
            ticket = call["Args"][1]
        reply = rpc.call(steps.get(call["Method"], "plugin.Step"),
                         {"EventId": reply["EventId"], "Data": answers.get(call["Method"])})
    return ticket, target


def test_a_ticket_is_good_only_at_the_process_it_names_and_only_once(two: PluginServerProcess,
                                                                      mock_provider: MockProvider) -> None:
    rpc = KongRPC(two.socket_path)
    conf = dict(config(mock_provider), __plugin_id=str(uuid.uuid4()), __seq__=1, __key__="k")
    iid = rpc.call("plugin.StartInstance", {"Name": "llm-gateway", "Config": json.dumps(conf)})["Id"]
    body = json.dumps({"model": "demo", "messages": HELLO}).encode()
    minted = dict(_run_access(rpc, iid, body, CAROL)[::-1] for _ in range(2))  # round-robin: one each
    assert None in minted and len(minted) == 2, minted
    master_ticket = minted.pop(None)
    (host, port), worker_ticket = next(iter(minted.items()))
    assert isinstance(port, int) and host == "127.0.0.1"
    master, worker = f"http://{two.listen}", f"http://{host}:{port}"
    [worker_pid] = [r["Pid"] for r in processes(two) if r["Port"] == port]

    def at(url: str, ticket: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", content=body, timeout=30,
                          headers={TICKET: ticket, "Content-Type": "application/json"})

    for ticket, wrong, right, pid in ((worker_ticket, master, worker, worker_pid),
                                      (master_ticket, worker, master, two.pid)):
        refused = at(wrong, ticket)  # minted for another process: a bypass, and the ticket is not spent
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "gateway_bypass"
        served = at(right, ticket)
        assert served.status_code == 200 and int(served.headers[PROCESS]) == pid
        replayed = at(right, ticket)
        assert replayed.status_code == 403 and replayed.json()["error"]["code"] == "gateway_bypass"
    forged = worker_ticket.replace(worker_ticket.split(".")[6], worker_ticket.split(".")[6].split("-")[0] + "-"
                                   + master_ticket.split(".")[6].split("-")[1])
    assert at(master, forged).status_code == 403  # retargeted by hand: the MAC covers the target
    rpc.call("plugin.CloseInstance", iid)


def test_a_freshly_started_instance_is_known_to_every_worker(two: PluginServerProcess,
                                                           mock_provider: MockProvider) -> None:
    """StartInstance returns only once every worker holds the config: the very first requests of a new config
    are served wherever they land, never "config_reloaded"."""
    for _ in range(3):
        with route(two, config(mock_provider, f"fresh-{secrets.token_hex(4)}")) as kong:
            served = [post(kong) for _ in range(2)]
        assert [r.status_code for r in served] == [200, 200], served[-1].text
        assert len({r.headers[PROCESS] for r in served}) == 2  # one of the two was a worker's


# -- metrics -------------------------------------------------------------------------------------------------
def _requests_counted(server: PluginServerProcess, alias: str) -> float:
    text = httpx.get(f"http://{server.metrics}/metrics", timeout=10).text  # type: ignore[attr-defined]
    return sum(sample.value for family in text_string_to_metric_families(text) if family.name == "llm_gateway_requests"
               for sample in family.samples if sample.name.endswith("_total") and sample.labels.get("alias") == alias)


def test_metrics_sum_every_process(two: PluginServerProcess, mock_provider: MockProvider) -> None:
    alias = f"summed-{secrets.token_hex(3)}"
    with route(two, config(mock_provider, alias)) as kong:
        served = [post(kong, alias) for _ in range(10)]
    assert [r.status_code for r in served] == [200] * 10
    assert len({r.headers[PROCESS] for r in served}) == 2
    wait_for(lambda: _requests_counted(two, alias) == 10, "the master's /metrics does not sum the worker's requests",
             timeout=5)
    ready = httpx.get(f"http://{two.metrics}/health/ready", timeout=10).json()  # type: ignore[attr-defined]
    assert ready["checks"]["processes"]["ok"] and ready["status"] == "ok"


# -- memory budgets --------------------------------------------------------------------------------------------
LIMIT, MAX_TOKENS = 300, 20


async def _burst(url: str, key: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as client:
        async def one(i: int) -> httpx.Response:
            return await client.post(f"{url}/v1/chat/completions", headers={"apikey": key},
                                     json={"model": "gpt", "max_tokens": MAX_TOKENS,
                                           "messages": [{"role": "user", "content": f"hi {i}"}]})
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_memory_budgets_stay_exact_across_processes(two: PluginServerProcess, mock_provider: MockProvider) -> None:
    """No Redis: each process's memory store would admit the whole limit on its own, twice the budget over two
    processes. Every request of a budgeted consumer goes to one process, so the limit holds; carol's budget lives
    in the master, dave's in the worker."""
    budgeted = config(mock_provider, budgets=[{"name": "daily", "window": "day", "tokens": LIMIT}])
    with route(two, budgeted) as kong:
        for key in (CAROL_KEY, DAVE_KEY):
            responses = asyncio.run(_burst(kong.url, key, 80))
            admitted = [r for r in responses if r.status_code == 200]
            rejected = [r for r in responses if r.status_code == 429]
            assert len(admitted) + len(rejected) == 80, {r.status_code for r in responses}
            assert admitted and rejected, "the limit should both admit and refuse part of the burst"
            assert len({r.headers[PROCESS] for r in admitted + rejected}) == 1, "a budgeted consumer moved"
            used = sum(int(r.headers["X-LLM-Total-Tokens"]) for r in admitted)
            assert used <= LIMIT + MAX_TOKENS + 50, f"{used} tokens admitted against a budget of {LIMIT}"
        # consumers without budgets on the route still spread
        unbudgeted = config(mock_provider, f"free-{secrets.token_hex(3)}")
        kong.set_config(unbudgeted)
        assert len({post(kong, key=CAROL_KEY).headers[PROCESS] for _ in range(4)}) == 2
    assert {r.headers[PROCESS] for r in admitted} == {str(processes(two)[1]["Pid"])}  # dave's: the worker's


# -- failures ----------------------------------------------------------------------------------------------------
def _ready(server: PluginServerProcess) -> int:
    return httpx.get(f"http://{server.metrics}/health/ready", timeout=10).status_code  # type: ignore[attr-defined]


def test_a_killed_worker_is_restarted_and_requests_keep_succeeding(two: PluginServerProcess,
                                                                   mock_provider: MockProvider) -> None:
    [worker] = [r for r in processes(two) if r["Role"] == "worker"]
    with route(two, config(mock_provider)) as kong:
        assert post(kong).status_code == 200
        os.kill(worker["Pid"], signal.SIGKILL)
        wait_for(lambda: not processes(two)[1]["Serving"], "the master never noticed its worker died", 5)
        assert _ready(two) == 503  # /health/ready says so until it is back
        while not processes(two)[1]["Serving"]:  # meanwhile the master serves alone, with no retry
            response = post(kong)
            assert response.status_code == 200, response.text
            if int(response.headers[PROCESS]) != two.pid:  # only the reborn worker, once it serves again
                assert processes(two)[1]["Serving"], "a request went to the dead worker"
        [reborn] = [r for r in processes(two) if r["Role"] == "worker"]
        assert reborn["Pid"] != worker["Pid"]
        served = [post(kong, model) for model in ("demo", "gpt") * 2]
        assert [r.status_code for r in served] == [200] * 4
        assert {int(r.headers[PROCESS]) for r in served} == {two.pid, reborn["Pid"]}
    assert _ready(two) == 200
    assert re.search(rf"worker 1 \(pid {worker['Pid']}\) exited; restarting", two.stderr_text())
    text = httpx.get(f"http://{two.metrics}/metrics", timeout=10).text  # type: ignore[attr-defined]
    assert "llm_gateway_process_restarts_total 1.0" in text


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "master killed"])
def test_the_whole_group_stops_with_the_master(how: signal.Signals, tmp_path: Path) -> None:
    """SIGTERM stops every process; a master killed outright takes its zygote and workers with it."""
    server = _start(tmp_path, LLM_GATEWAY_METRICS_LISTEN="off")
    try:
        [zygote] = _children(server.pid)
        workers = _children(zygote)
        assert [r["Pid"] for r in processes(server)][1:] == workers
        os.kill(server.pid, how)
        server.proc.wait(30)
        wait_for(lambda: not any(map(_alive, [zygote, *workers])), "a worker or the zygote outlived the master", 15)
    finally:
        server.stop()


# -- kong reload ---------------------------------------------------------------------------------------------------
def _serve(socket_path: str, listen: str, demo: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "kong-plugins"),
               MOCK_PROVIDER_KEY=PROVIDER_KEY, LLM_GATEWAY_PROCESSES="2")
    return subprocess.Popen([sys.executable, "-m", "llm_gateway", "serve", "--socket", socket_path, "--listen", listen,
                             "--demo-listen", demo, "--metrics-listen", "off"], env=env, stderr=open(log, "wb"))


def _refuses(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_on_kong_reload_the_old_workers_stop_accepting_and_finish_their_streams(
        tmp_path: Path, mock_provider: MockProvider) -> None:
    socket_path, listen, demo = str(tmp_path / "s.sock"), f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    old, new = _serve(socket_path, listen, demo, old_log), None
    try:
        wait_for(lambda: "plugin server ready" in old_log.read_text(), "the first server never got ready", 60)
        rpc = KongRPC(socket_path)  # an old nginx worker's pooled connection: it lives on after the reload
        plugin = dict(config(mock_provider), __plugin_id=str(uuid.uuid4()), __seq__=1, __key__="k")
        plugin["models"].append({"name": "drip", "deployments": [{"model": "openai/mock-gpt-drip-50-words-40",
                                                                  "api_base": mock_provider.openai_base,
                                                                  "api_key_env": "MOCK_PROVIDER_KEY"}]})
        iid = rpc.call("plugin.StartInstance", {"Name": "llm-gateway", "Config": json.dumps(plugin)})["Id"]
        body = json.dumps({"model": "drip", "stream": True, "messages": HELLO}).encode()
        ticket, target = _run_access(rpc, iid, body, CAROL)
        if target is None:  # round-robin: the next one is the worker's
            ticket, target = _run_access(rpc, iid, body, CAROL)
        assert target is not None
        chunks: list[bytes] = []

        def stream() -> None:
            with httpx.stream("POST", f"http://{target[0]}:{target[1]}/v1/chat/completions", content=body,
                              headers={TICKET: ticket, "Content-Type": "application/json"}, timeout=30) as response:
                chunks.extend(response.iter_bytes())

        streaming = threading.Thread(target=stream)
        streaming.start()
        wait_for(lambda: chunks, "the stream never started", 10)
        new = _serve(socket_path, listen, demo, new_log)
        wait_for(lambda: "plugin server ready" in new_log.read_text(), "the successor never got ready", 60)
        wait_for(lambda: _refuses(target[1]), "the old worker still accepts after stepping aside", 10)
        streaming.join(30)
        assert b"data: [DONE]" in b"".join(chunks), "the old worker's stream was cut"
        assert old.poll() is None, "the old server must finish its requests, not die"
        # what the old master still mints names itself: the successor's port answers it 503, retryable
        late, late_target = _run_access(rpc, iid, json.dumps({"model": "demo", "messages": HELLO}).encode(), CAROL)
        assert late_target is None
        answered = httpx.post(f"http://{listen}/v1/chat/completions", timeout=30,
                              content=json.dumps({"model": "demo", "messages": HELLO}).encode(),
                              headers={TICKET: late, "Content-Type": "application/json"})
        assert answered.status_code == 503 and answered.json()["error"]["code"] == "gateway_restarting"
    finally:
        for proc in (old, new):
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
                if proc.poll() is None:
                    proc.kill()
