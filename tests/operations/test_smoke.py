"""``kong-llm-gateway smoke`` and ``kong-llm-gateway health`` against the harness (the real-Kong tier runs smoke
against a real Kong too: tests/kong/test_real_kong.py). Run as a user runs them: the command, in a process of its
own."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading

from conftest import ALICE_KEY, free_port, route_to
from kong_harness import KongHarness, PluginServerProcess, _plugin_env


def smoke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_gateway", "smoke", *args], env=_plugin_env(None),
                          capture_output=True, text=True, timeout=120)


def test_smoke_prints_answer_stream_usage_cost_and_the_routing_headers(kong: KongHarness,
                                                                       plugin_server: PluginServerProcess) -> None:
    done = smoke("--url", kong.url, "--key", ALICE_KEY, "--model", "priced-gpt",
                 "--ready-url", f"http://{plugin_server.metrics}/health/ready")  # type: ignore[attr-defined]
    assert done.returncode == 0, done.stderr
    out = done.stdout
    json_part, stream_part = out.split("(model priced-gpt, stream)")
    assert "answer: Hello from mock-gpt" in json_part
    assert "usage: " in json_part and " tokens, cost $0.0000" in json_part
    for header in ("X-Request-ID", "X-LLM-Provider: openai", "X-LLM-Model: mock-gpt-cached-3-reasoning-2",
                   "X-LLM-Deployment: priced-gpt#0", "X-LLM-Attempts: 1", "X-LLM-Cost-USD"):
        assert header in json_part, (header, json_part)
    assert "stream: Hello from mock-gpt" in stream_part  # the streamed text, as it arrived
    assert "time to first token" in stream_part and ", cost $0.0000" in stream_part
    assert "X-LLM-Provider: openai" in stream_part and "X-LLM-Attempts: 1" in stream_part
    assert out.rstrip().endswith("through llm-gateway.") and ALICE_KEY not in out + done.stderr


def test_smoke_with_the_default_model_needs_no_provider_key(kong: KongHarness) -> None:
    """--model defaults to demo, the built-in demo provider: the first run needs no API key."""
    done = smoke("--url", kong.url, "--key", ALICE_KEY)
    assert done.returncode == 0, done.stderr
    assert "X-LLM-Provider: demo" in done.stdout and "X-LLM-Deployment: demo#0" in done.stdout


def test_smoke_fails_readably_on_a_wrong_key_an_unknown_model_and_kong_down(kong: KongHarness) -> None:
    wrong = smoke("--url", kong.url, "--key", "not-a-key")
    assert wrong.returncode == 1 and "Kong refused the key (401" in wrong.stderr, wrong.stderr
    assert "not-a-key" not in wrong.stdout + wrong.stderr
    unknown = smoke("--url", kong.url, "--key", ALICE_KEY, "--model", "no-such-model")
    assert unknown.returncode == 1 and "the route has no model 'no-such-model'" in unknown.stderr, unknown.stderr
    down = smoke("--url", f"http://127.0.0.1:{free_port()}", "--key", ALICE_KEY)
    assert down.returncode == 1 and "cannot reach Kong" in down.stderr and "connection refused" in down.stderr
    no_route = smoke("--url", kong.url + "/elsewhere", "--key", ALICE_KEY)
    assert no_route.returncode == 1 and "no Kong route answers" in no_route.stderr, no_route.stderr
    for failed in (wrong, unknown, down, no_route):
        assert "Traceback" not in failed.stderr and failed.stderr.count("\n") == 1


def test_smoke_fails_when_the_plugin_server_is_not_answering(plugin_server: PluginServerProcess,
                                                             mock_provider: object) -> None:
    """Kong's 502 when the Service (the listener) is gone, as while the plugin server restarts; and a readiness
    URL nobody answers."""
    from conftest import gateway_config

    with route_to(plugin_server, gateway_config(mock_provider)) as kong:  # type: ignore[arg-type]
        kong.service_url = f"http://127.0.0.1:{free_port()}"
        gone = smoke("--url", kong.url, "--key", ALICE_KEY)
        assert gone.returncode == 1, gone.stdout
        assert "could not get an answer from the llm-gateway plugin server (502" in gone.stderr, gone.stderr
        not_ready = smoke("--url", kong.url, "--key", ALICE_KEY,
                          "--ready-url", f"http://127.0.0.1:{free_port()}/health/ready")
        assert not_ready.returncode == 1 and "plugin server is not ready" in not_ready.stderr


def test_smoke_tells_a_failing_provider_from_an_absent_plugin_server(kong: KongHarness) -> None:
    cut = smoke("--url", kong.url, "--key", ALICE_KEY, "--model", "provider-500")
    assert cut.returncode == 1
    assert "the provider failed (502 provider_error" in cut.stderr, cut.stdout + cut.stderr


def test_health_command_says_ready_or_why_not(plugin_server: PluginServerProcess) -> None:
    url = f"http://{plugin_server.metrics}/health/ready"  # type: ignore[attr-defined]
    ready = subprocess.run([sys.executable, "-m", "llm_gateway", "health", "--url", url], env=_plugin_env(None),
                           capture_output=True, text=True, timeout=30)
    assert ready.returncode == 0 and ready.stdout.strip() == "ready"
    env = {**_plugin_env(None), "LLM_GATEWAY_METRICS_LISTEN": f"0.0.0.0:{free_port()}"}
    down = subprocess.run([sys.executable, "-m", "llm_gateway", "health"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert down.returncode == 1 and down.stderr.startswith("not ready: no answer from http://127.0.0.1:")


class _Streams(http.server.BaseHTTPRequestHandler):
    """Answers JSON requests properly and streams as the path says: one chunk, then an error event or nothing."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not body.get("stream"):
            answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine"}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self._send("application/json", answer)
            return
        chunk = {"choices": [{"delta": {"content": "par"}}]}
        events = f"data: {json.dumps(chunk)}\n\n"
        if self.path.startswith("/error"):
            events += 'data: {"error": {"code": "provider_error", "message": "The provider failed."}}\n\n'
        self._send("text/event-stream", events.encode())

    def _send(self, content_type: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_smoke_fails_on_an_error_event_or_a_stream_without_its_end() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Streams)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        failed = smoke("--url", f"{base}/error", "--key", "k")
        assert failed.returncode == 1 and "answer: fine" in failed.stdout and "stream: par" in failed.stdout
        assert "the stream ended with an error event (provider_error: The provider failed.)" in failed.stderr
        cut = smoke("--url", f"{base}/cut", "--key", "k")
        assert cut.returncode == 1 and "ended without its final [DONE] event" in cut.stderr, cut.stderr
    finally:
        server.shutdown()
