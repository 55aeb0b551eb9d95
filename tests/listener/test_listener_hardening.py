"""The listener as a hostile client, a broken accounting and a departing client meet it (issue 10, items 3, 9, 10).

Through the Kong-side harness and the real plugin server, and with raw sockets straight at its listener: the one
port Kong proxies to, which anything on the host can reach. A second plugin server runs with faults injected
(tests/faults/sitecustomize.py) to make accounting and request handling raise, as bugs there would.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import ALICE_KEY, CONSUMERS, free_port, gateway_config, route_to, usage_records, wait_for_record
from kong_harness import PLUGINS_DIR, KongHarness, PluginServerProcess, RequestCtx, start_plugin_server
from mock_provider import MockProvider

HELLO = [{"role": "user", "content": "Say hello to the gateway"}]
FAULTS_DIR = Path(__file__).resolve().parents[1] / "faults"
HEADER_TIMEOUT = 5.0  # strict_server.HEADER_TIMEOUT
BODY_TIMEOUT = 5.0  # listener.BODY_TIMEOUT


# -- helpers --------------------------------------------------------------------------------------------------
def requests_by_status(metrics_listen: str) -> dict[str, float]:
    """llm_gateway_requests_total summed over every label but status."""
    text = urllib.request.urlopen(f"http://{metrics_listen}/metrics", timeout=5).read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llm_gateway_requests_total{"):
            status = re.search(r'status="([^"]*)"', line).group(1)  # type: ignore[union-attr]
            counts[status] = counts.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    changed = {s: after.get(s, 0) - before.get(s, 0) for s in set(after) | set(before)}
    return {s: n for s, n in changed.items() if n}


def wait_for(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


def raw_exchange(listen: str, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(host_port(listen), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def assert_openai_error(body: bytes, status_code: str | None = None) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if status_code is not None:
        assert error["code"] == status_code, error
    return error


def log_lines_for(server: PluginServerProcess, request_id: str) -> list[dict]:
    """The plugin server's JSON log lines about one request (its request_id field, or naming it)."""
    lines = [json.loads(line) for line in server.log_lines() if line.startswith("{")]
    return [line for line in lines if line.get("request_id") == request_id or request_id in line.get("message", "")]


# -- a plugin server with faults ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginServerProcess]:
    socket_path = str(tmp_path_factory.mktemp("kong-prefix-faults") / "llm-gateway.sock")
    metrics = f"127.0.0.1:{free_port()}"
    path = os.pathsep.join(p for p in (str(FAULTS_DIR), str(PLUGINS_DIR), os.environ.get("PYTHONPATH")) if p)
    from conftest import PROVIDER_KEY

    server = start_plugin_server(socket_path, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                 env={"MOCK_PROVIDER_KEY": PROVIDER_KEY, "LLM_GATEWAY_TEST_FAULTS": "1",
                                      "LLM_GATEWAY_METRICS_LISTEN": metrics, "PYTHONPATH": path})
    server.metrics = metrics  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def faulty_kong(faulty_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    with route_to(faulty_server, gateway_config(mock_provider)) as harness:
        yield harness


# -- item 3: framing and accounting ---------------------------------------------------------------------------
def test_accounting_failure_at_stream_end_ends_the_stream_cleanly(faulty_kong: KongHarness,
                                                                  faulty_server: PluginServerProcess) -> None:
    """The provider cuts the stream without usage, the estimator raises while accounting: the client still gets
    one well-framed SSE stream ending with an error event, and the answer is counted, without a traceback."""
    before = requests_by_status(faulty_server.metrics)  # type: ignore[attr-defined]
    body = {"model": "cut-stream", "stream": True,
            "messages": [{"role": "user", "content": "FAULT:estimate please"}]}
    with httpx.Client(timeout=15) as client:  # without the fix the body never ends: a read timeout
        response = client.post(f"{faulty_kong.url}/v1/chat/completions", json=body, headers={"apikey": ALICE_KEY})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "HTTP/1.1" not in response.text, "a second HTTP response was written inside the stream"
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "provider_error"
    assert "[DONE]" not in events
    request_id = response.headers["X-Request-ID"]
    wait_for(lambda: delta(before, requests_by_status(faulty_server.metrics)) == {"502": 1})  # type: ignore[attr-defined]
    lines = log_lines_for(faulty_server, request_id)
    assert not any("Traceback" in line for line in faulty_server.log_lines())
    assert sum(line["level"] == "ERROR" for line in lines) <= 1, lines


def test_unexpected_failure_before_accounting_is_a_counted_500(faulty_kong: KongHarness,
                                                              faulty_server: PluginServerProcess) -> None:
    before = requests_by_status(faulty_server.metrics)  # type: ignore[attr-defined]
    body = {"model": "gpt-mock", "messages": [{"role": "user", "content": "FAULT:parse"}]}
    response = httpx.post(f"{faulty_kong.url}/v1/chat/completions", json=body, headers={"apikey": ALICE_KEY},
                          timeout=15)
    assert response.status_code == 500
    error = assert_openai_error(response.content, "internal_error")
    assert "injected" not in error["message"] and "RuntimeError" not in response.text
    wait_for(lambda: delta(before, requests_by_status(faulty_server.metrics)) == {"500": 1})  # type: ignore[attr-defined]


def test_client_leaving_mid_stream_is_a_499_record_without_a_traceback(kong: KongHarness,
                                                                      plugin_server: PluginServerProcess) -> None:
    before = requests_by_status(plugin_server.metrics)  # type: ignore[attr-defined]
    logged = len(plugin_server.stderr_text())  # the session's server: earlier tests log their own tracebacks
    body = json.dumps({"model": "drip", "stream": True, "messages": HELLO}).encode()
    with httpx.Client(timeout=15) as client, client.stream(
            "POST", f"{kong.url}/v1/chat/completions", content=body,
            headers={"apikey": ALICE_KEY, "Content-Type": "application/json"}) as response:
        request_id = response.headers["X-Request-ID"]
        next(response.iter_raw())  # the first chunk, then hang up
    record = wait_for_record(plugin_server, request_id)
    assert record["status"] == 499 and record["error_code"] == "client_disconnected" and record["truncated"]
    assert record["completion_tokens"] > 0, "what the provider produced before the client left is charged"
    wait_for(lambda: delta(before, requests_by_status(plugin_server.metrics)).get("499") == 1)  # type: ignore[attr-defined]
    lines = log_lines_for(plugin_server, request_id)
    assert not any(line["level"] == "ERROR" for line in lines), lines
    assert any(line["level"] == "INFO" and line["logger"] == "llm_gateway.listener" and "left" in line["message"]
               for line in lines), lines
    assert "Traceback" not in plugin_server.stderr_text()[logged:]


def admitted_request(kong: KongHarness, body: bytes) -> bytes:
    """A request as Kong would send it to the listener after our access phase admitted it (ticket included), as
    raw HTTP/1.1: for tests that must act on the listener's own connection, as nginx does when its client aborts
    (it closes the upstream connection; the harness's proxy does not)."""
    consumer = CONSUMERS[ALICE_KEY]
    ctx = RequestCtx("POST", "/v1/chat/completions", {}, {"content-type": "application/json"}, body,
                     {"id": consumer["id"], "username": consumer["username"]}, {"id": "cred", "key": ALICE_KEY})
    kong._access(ctx, [])
    assert ctx.exit is None, ctx.exit
    head = "".join(f"{k}: {v}\r\n" for k, v in ctx.headers.items())
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_client_leaving_before_a_json_answer_is_recorded_as_499(kong: KongHarness,
                                                                 plugin_server: PluginServerProcess) -> None:
    """Kong closes the upstream connection when its client aborts: the provider's answer is still charged, and
    the record says the client never got it."""
    raw = admitted_request(kong, json.dumps({"model": "slow-300", "messages": HELLO, "user": "leaver"}).encode())
    before = set(usage_records(plugin_server))
    with socket.create_connection(host_port(plugin_server.listen), timeout=10) as sock:
        sock.sendall(raw)
        time.sleep(0.1)  # the provider is still thinking
    wait_for(lambda: set(usage_records(plugin_server)) - before)
    (request_id,) = set(usage_records(plugin_server)) - before
    record = usage_records(plugin_server)[request_id]
    assert record["status"] == 499 and record["error_code"] == "client_disconnected"
    assert record["total_tokens"] > 0


# -- item 9: every answer is counted --------------------------------------------------------------------------
def test_every_status_is_counted(kong: KongHarness, plugin_server: PluginServerProcess) -> None:
    url = f"{kong.url}/v1/chat/completions"
    auth = {"apikey": ALICE_KEY, "Content-Type": "application/json"}
    before = requests_by_status(plugin_server.metrics)  # type: ignore[attr-defined]
    with httpx.Client(timeout=15) as client:
        answers = [
            client.post(url, content=b"{not json", headers=auth),  # 400
            client.post(f"http://{plugin_server.listen}/v1/chat/completions", json={"model": "gpt-mock"},
                        headers={"X-LLM-Gateway-Ticket": "v1.forged"}),  # 403
            client.post(url, json={"model": "no-such-alias", "messages": HELLO}, headers=auth),  # 404
            client.post(f"http://{plugin_server.listen}/v2/nothing", json={}),  # 404, no route
            client.get(f"http://{plugin_server.listen}/v1/chat/completions"),  # 405
            client.post(url, content=b"x" * (70 * 1024), headers=auth),  # 413
            client.post(url, content=b"{}", headers={**auth, "Content-Encoding": "br"}),  # 415
            client.post(url, json={"model": "gpt-mock", "messages": HELLO}, headers=auth),  # 200
        ]
    statuses = [a.status_code for a in answers]
    assert statuses == [400, 403, 404, 404, 405, 413, 415, 200]
    for answer in answers[:-1]:
        assert_openai_error(answer.content)
    expected = {"400": 1, "403": 1, "404": 2, "405": 1, "413": 1, "415": 1, "200": 1}
    wait_for(lambda: delta(before, requests_by_status(plugin_server.metrics)) == expected)  # type: ignore[attr-defined]


# -- item 10: the listener ------------------------------------------------------------------------------------
def test_half_sent_requests_are_dropped_and_kong_still_gets_through(client_ok: None, kong: KongHarness,
                                                                   plugin_server: PluginServerProcess) -> None:
    """500 connections holding half their headers, 50 sending nothing, 20 with half a body (10 of them admitted
    by Kong's access phase): a legitimate request still gets through while they are held, and each of them is
    dropped within a few seconds (a body without a ticket at once, before it is read)."""
    address = host_port(plugin_server.listen)
    sockets: list[socket.socket] = []
    try:
        for i in range(570):
            if 550 <= i < 560:
                whole = admitted_request(kong, b'{"model": "gpt-mock", "messages": []}' + b" " * 1000)
                half_admitted = whole[:-1000]
            sock = socket.create_connection(address, timeout=30)
            if i < 500:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            elif i >= 560:  # not from Kong: refused before a byte of the body is read
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":")
            elif i >= 550:  # admitted by Kong, then the body stalls
                sock.sendall(half_admitted)
            sockets.append(sock)
        answer = httpx.post(f"{kong.url}/v1/chat/completions", json={"model": "gpt-mock", "messages": HELLO},
                            headers={"apikey": ALICE_KEY}, timeout=15)
        assert answer.status_code == 200

        def outcome(sock: socket.socket) -> bytes:
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
            return received

        started = time.monotonic()
        with ThreadPoolExecutor(64) as pool:
            outcomes = list(pool.map(outcome, sockets))  # a socket the server never closes times out (30 s)
        assert time.monotonic() - started < max(HEADER_TIMEOUT, BODY_TIMEOUT) + 15
        assert all(o == b"" for o in outcomes[:550]), "half-sent headers are dropped without an answer"
        for o in outcomes[550:560]:
            status, headers, body = parse_response(o)
            assert status == 408 and headers["connection"] == "close"
            assert_openai_error(body, "request_timeout")
        for o in outcomes[560:]:
            status, headers, body = parse_response(o)
            assert status == 503  # no ticket: Kong failed open, or not Kong at all (kong/ticket.py)
            assert_openai_error(body, "gateway_restarting")
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def client_ok(kong: KongHarness) -> None:
    """Warm the route (instance started) so the request under load measures the listener, not start-up."""
    httpx.post(f"{kong.url}/v1/chat/completions", json={"model": "gpt-mock", "messages": HELLO},
               headers={"apikey": ALICE_KEY}, timeout=15).raise_for_status()


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400, "malformed_request"),  # TLS hello
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "malformed_request"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
     "request_header_too_large"),
    (b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "request_header_too_large"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n", 400,
     "malformed_request"),
])
def test_malformed_raw_requests_get_openai_errors(plugin_server: PluginServerProcess, raw: bytes, status: int,
                                                  code: str) -> None:
    got, headers, body = parse_response(raw_exchange(plugin_server.listen, raw))
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert headers["server"] == "llm-gateway"
    assert "aiohttp" not in body.decode(errors="replace").lower()
    assert_openai_error(body, code)


def test_no_response_names_aiohttp(plugin_server: PluginServerProcess) -> None:
    for answer in (httpx.post(f"http://{plugin_server.listen}/v1/chat/completions", json={}),
                   httpx.get(f"http://{plugin_server.listen}/nowhere")):
        assert answer.headers["server"] == "llm-gateway"


def test_wrong_method_is_405_with_allow(plugin_server: PluginServerProcess) -> None:
    for method, path in itertools.product(("GET", "PUT", "DELETE", "PATCH"), ("/v1/chat/completions",
                                                                             "/v1/embeddings")):
        answer = httpx.request(method, f"http://{plugin_server.listen}{path}")
        assert answer.status_code == 405 and answer.headers["allow"] == "POST"
        error = assert_openai_error(answer.content, "method_not_allowed")
        assert method in error["message"]
    answer = httpx.get(f"http://{plugin_server.listen}/v1/no-such-endpoint")
    assert answer.status_code == 404
    assert_openai_error(answer.content, "unknown_url")


def test_client_values_are_echoed_truncated(kong: KongHarness, plugin_server: PluginServerProcess) -> None:
    model = "m" * 60_000
    answer = httpx.post(f"{kong.url}/v1/chat/completions", json={"model": model, "messages": HELLO},
                        headers={"apikey": ALICE_KEY}, timeout=15)
    assert answer.status_code == 404
    error = assert_openai_error(answer.content, "model_not_found")
    assert len(error["message"]) < 400 and "60000 characters" in error["message"]
    path = "/" + "p" * 5000
    answer = httpx.get(f"http://{plugin_server.listen}{path}")
    assert answer.status_code == 404 and len(answer.text) < 600


def test_concurrent_keepalive_requests_still_work(kong: KongHarness) -> None:
    """The header deadline applies per request: a keep-alive connection serving requests back to back (as Kong's
    upstream pool does) is not dropped between or during them."""
    with httpx.Client(timeout=15) as client:
        for _ in range(3):
            answer = client.post(f"{kong.url}/v1/chat/completions",
                                 json={"model": "gpt-mock", "messages": HELLO}, headers={"apikey": ALICE_KEY})
            assert answer.status_code == 200


def test_idle_keepalive_connection_survives_past_the_header_deadline(plugin_server: PluginServerProcess) -> None:
    """Kong keeps upstream connections idle for up to 60 s: an idle connection after a complete request is not
    dropped at the header deadline, and its next request is answered."""
    request = (b"GET /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    with socket.create_connection(host_port(plugin_server.listen), timeout=15) as sock:
        sock.sendall(request)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 405")
        time.sleep(HEADER_TIMEOUT + 1.5)
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 405")

