"""Real Kong: build ``Dockerfile.kong``, run the image, and talk to Kong 3.9.1 on its proxy port.

The only tests with a real Kong in front of the plugin server: key-auth and rate-limiting really run first,
Kong really proxies to the listener and streams its SSE, and ``kong config parse`` really validates kong.yml
against the schema our ``query_cmd`` prints. They skip, saying why, when no Docker engine answers.
"""

from __future__ import annotations

import base64
import copy
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]  # the first build downloads Kong, apt and pip

REPO = Path(__file__).resolve().parent.parent
IMAGE = "kong-llm-gateway:test"
KEY = "demo-key-alice"  # kong.yml's demo-only consumers
POLL_KEY = "demo-key-bob"  # readiness polling spends bob's rate limit (120/min), not alice's
HELLO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
STARTUP_SECONDS = 90
ENV_PROBE = "env-passthrough-probe-not-a-key"  # OPENAI_API_KEY in the container, to follow it to the server

# Run inside the container: the listener must refuse whatever did not come through Kong's access phase.
BYPASS_SCRIPT = r"""
import json, urllib.error, urllib.request
body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}).encode()
for ticket in (None, "forged.ticket.value"):
    headers = {"Content-Type": "application/json"}
    if ticket:
        headers["X-LLM-Gateway-Ticket"] = ticket
    request = urllib.request.Request("http://127.0.0.1:8787/v1/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(json.dumps([response.status, response.read().decode()]))
    except urllib.error.HTTPError as err:
        print(json.dumps([err.code, err.read().decode()]))
"""

# Run inside the container: which variables reached the plugin server Kong's worker started?
SERVER_ENV_SCRIPT = r"""
import json, os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        if any(a.endswith(b"kong-llm-gateway") for a in argv) and b"serve" in argv:
            pairs = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            print(json.dumps(dict(p.decode().split("=", 1) for p in pairs if b"=" in p)))
            break
    except OSError:
        pass
"""

# Run inside the container: the plugin server's Prometheus metrics.
METRICS_SCRIPT = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9542/metrics').read().decode())"


@dataclass
class KongContainer:
    container: Any
    url: str
    http: httpx.Client

    def post(self, body: dict[str, Any], key: str | None = KEY) -> httpx.Response:
        headers = {"apikey": key} if key else {}
        return self.http.post(f"{self.url}/v1/chat/completions", json=body, headers=headers)

    def exec(self, argv: list[str]) -> tuple[int, str]:
        result = self.container.exec_run(argv)
        return result.exit_code, result.output.decode(errors="replace")


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"[:300]
        pytest.skip(f"no Docker engine answers ({reason}): the real-Kong test needs one")
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(engine: Any) -> Any:
    import docker

    try:
        built, _ = engine.images.build(path=str(REPO), dockerfile="Dockerfile.kong", tag=IMAGE, rm=True,
                                       forcerm=True)
    except docker.errors.BuildError as exc:
        log = "".join(str(chunk.get("stream") or chunk.get("error") or "") for chunk in exc.build_log)
        pytest.fail(f"docker build -f Dockerfile.kong failed: {exc.msg}\n{log[-8000:]}")
    return built


def _engine_host(engine: Any) -> str:
    """Where published ports are reachable: the engine's host for a TCP engine, else this machine."""
    url = urllib.parse.urlparse(engine.api.base_url)
    if url.scheme in ("http", "https") and url.hostname:
        return url.hostname
    return "127.0.0.1"


def _logs(container: Any) -> str:
    try:
        return container.logs(tail=500).decode(errors="replace")
    except Exception as exc:
        return f"(could not read the container's logs: {exc})"


def _show(request: pytest.FixtureRequest, text: str) -> None:
    """Print past pytest's capture, so a teardown can show Kong's logs after a failed test."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        print(text)


def _published_url(engine: Any, container: Any) -> str:
    deadline = time.monotonic() + 30
    while True:
        container.reload()
        if container.status in ("exited", "dead"):
            raise RuntimeError(f"Kong's container stopped ({container.status}) while starting")
        bindings = container.ports.get("8000/tcp")
        if bindings:
            return f"http://{_engine_host(engine)}:{bindings[0]['HostPort']}"
        if time.monotonic() > deadline:
            raise RuntimeError("port 8000 of Kong's container was never published")
        time.sleep(0.5)


def _wait_until_ready(kong: KongContainer) -> None:
    """Kong first (any answer from Kong will do: 404 for no route), then the plugin server: until it listens
    (LiteLLM is importing), a keyed request gets 500 from Kong or 502 from the not-yet-bound listener."""
    deadline = time.monotonic() + STARTUP_SECONDS
    last = "no answer yet"

    def until(ready: Callable[[], bool]) -> bool:
        nonlocal last
        while time.monotonic() < deadline:
            kong.container.reload()
            if kong.container.status in ("exited", "dead"):
                raise RuntimeError(f"Kong's container stopped ({kong.container.status}); last answer: {last}")
            try:
                if ready():
                    return True
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(1)  # at most 60 requests a minute: under the route's limit of 120
        return False

    def kong_answers() -> bool:
        nonlocal last
        response = kong.http.get(f"{kong.url}/")
        last = f"GET / -> {response.status_code} {response.text[:200]}"
        return "kong" in response.headers.get("Server", "").lower() or response.status_code in (401, 404)

    def plugin_server_answers() -> bool:
        nonlocal last
        response = kong.post(HELLO, key=POLL_KEY)
        last = f"keyed POST -> {response.status_code} {response.text[:300]}"
        return response.status_code not in (500, 502, 503)

    if not (until(kong_answers) and until(plugin_server_answers)):
        raise TimeoutError(f"Kong and its plugin server were not ready within {STARTUP_SECONDS} s; last: {last}")


@pytest.fixture(scope="module")
def kong(engine: Any, image: Any, request: pytest.FixtureRequest) -> Iterator[KongContainer]:
    container = engine.containers.run(
        image.id, detach=True, ports={"8000/tcp": None},
        # info: Kong logs the plugin server's own lines at INFO, so the logs printed on failure include them
        environment={"KONG_LOG_LEVEL": "info", "OPENAI_API_KEY": ENV_PROBE},
    )
    failures_before = request.session.testsfailed
    started = False
    try:
        with httpx.Client(timeout=30) as http:
            kong = KongContainer(container, _published_url(engine, container), http)
            try:
                _wait_until_ready(kong)
            except Exception as exc:
                pytest.fail(f"{exc}\n----- Kong's logs -----\n{_logs(container)}")
            started = True
            yield kong
    finally:
        if started and request.session.testsfailed > failures_before:
            _show(request, f"\n----- logs of Kong's container ({IMAGE}) -----\n{_logs(container)}")
        container.remove(force=True)


def test_chat_completion_through_real_kong(kong: KongContainer) -> None:
    response = kong.post(HELLO)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"] and isinstance(body["created"], int) and body["model"]
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert "hi" in choice["message"]["content"]  # the demo provider echoes the prompt
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
    assert response.headers["X-LLM-Provider"] == "demo"
    assert response.headers["X-LLM-Model"] == "echo"
    assert response.headers["X-Request-ID"] == response.headers["X-Kong-Request-Id"]  # Kong's request id
    assert response.headers["X-RateLimit-Limit-Minute"] == "120"  # rate-limiting ran before us
    assert int(response.headers["X-LLM-Prompt-Tokens"]) == body["usage"]["prompt_tokens"]
    assert response.headers["X-RateLimit-Limit-Tokens"] == "200000"  # kong.yml's hourly-tokens budget


def test_routing_through_real_kong(kong: KongContainer) -> None:
    """kong.yml's chat-default spreads over two demo deployments; auto routes by prompt complexity."""
    seen = set()
    for _ in range(12):
        response = kong.post({**HELLO, "model": "chat-default"})
        assert response.status_code == 200, response.text
        assert response.headers["X-LLM-Attempts"] == "1"
        seen.add(response.headers["X-LLM-Deployment"])
    assert seen <= {"echo-main", "echo-spare"} and "echo-main" in seen
    routed = kong.post({**HELLO, "model": "auto"})
    assert routed.status_code == 200 and routed.headers["X-LLM-Complexity"].endswith("routed=demo")


def test_metrics_count_the_consumers_tokens(kong: KongContainer) -> None:
    assert kong.post(HELLO).status_code == 200
    code, output = kong.exec(["/opt/llm-gateway/bin/python", "-c", METRICS_SCRIPT])
    assert code == 0, output
    tokens = [line for line in output.splitlines() if line.startswith("llm_gateway_tokens_total{")]
    assert any('consumer="alice"' in line and 'kind="prompt"' in line for line in tokens), output
    assert KEY not in output


def test_no_key_is_refused_by_key_auth(kong: KongContainer) -> None:
    response = kong.post(HELLO, key=None)
    assert response.status_code == 401, response.text
    assert "X-LLM-Provider" not in response.headers  # refused before the plugin server was involved


def test_stream_through_real_kong(kong: KongContainer) -> None:
    with kong.http.stream("POST", f"{kong.url}/v1/chat/completions", json={**HELLO, "stream": True},
                          headers={"apikey": KEY}) as response:
        assert response.status_code == 200, response.read().decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["X-LLM-Provider"] == "demo"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert len(chunks) > 1 and all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "hi" in text


def test_unknown_model_is_404_in_openai_format(kong: KongContainer) -> None:
    response = kong.post({**HELLO, "model": "no-such-model"})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == "model" and error["code"] == "model_not_found"


def test_listener_refuses_requests_that_bypass_kong(kong: KongContainer) -> None:
    code, output = kong.exec(["/opt/llm-gateway/bin/python", "-c", BYPASS_SCRIPT])
    assert code == 0, output
    answers = [json.loads(line) for line in output.splitlines() if line.startswith("[")]
    assert len(answers) == 2, output  # no ticket, then a forged one
    for status, body in answers:
        assert status == 403, body
        assert json.loads(body)["error"]["message"]


def test_provider_keys_reach_the_plugin_server(kong: KongContainer) -> None:
    """nginx strips its workers' environment down to the `env` directives (KONG_NGINX_MAIN_ENV), and the
    plugin server inherits a worker's: api_key_env only works for variables listed there."""
    code, output = kong.exec(["/opt/llm-gateway/bin/python", "-c", SERVER_ENV_SCRIPT])
    assert code == 0 and output.strip(), f"plugin server process not found: {output}"
    server_env = json.loads(output.strip().splitlines()[-1])
    assert server_env.get("OPENAI_API_KEY") == ENV_PROBE
    assert server_env.get("LITELLM_LOCAL_MODEL_COST_MAP") == "True"


def test_kong_parses_the_shipped_kong_yml(kong: KongContainer) -> None:
    code, output = kong.exec(["kong", "config", "parse", "/kong/kong.yml"])
    assert code == 0, output
    assert "parse successful" in output


# --- Kong enforcing our schema: `kong config parse` on variants of kong.yml, in a fresh container ---------


def _shipped_config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "kong.yml").read_text())


def _gateway(doc: dict[str, Any]) -> dict[str, Any]:
    plugins = doc["services"][0]["routes"][0]["plugins"]
    return next(p for p in plugins if p["name"] == "llm-gateway")["config"]


def _literal_api_key(doc: dict[str, Any]) -> None:
    _gateway(doc)["models"][0]["deployments"][0]["api_key"] = "a-literal-value-not-a-vault-reference"


def _no_models(doc: dict[str, Any]) -> None:
    del _gateway(doc)["models"]


def _no_deployments(doc: dict[str, Any]) -> None:
    _gateway(doc)["models"][0]["deployments"] = []


def _unknown_field(doc: dict[str, Any]) -> None:
    _gateway(doc)["temperature"] = 0.2


def _commented_examples(doc: dict[str, Any]) -> None:
    """The provider and Redis examples kong.yml carries as comments must be valid once uncommented."""
    _gateway(doc)["models"] += [
        {"name": "gpt-4o-mini", "deployments": [{"model": "openai/gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}]},
        {"name": "claude-sonnet", "deployments": [{"model": "anthropic/claude-3-5-sonnet-latest",
                                                   "api_key": "{vault://env/anthropic-api-key}"}]},
    ]
    _gateway(doc)["redis"] = {"url": "{vault://env/llm-gateway-redis-url}"}


@pytest.mark.parametrize(("mutate", "valid", "mentions"), [
    (_literal_api_key, False, "api_key"),
    (_no_models, False, "models"),
    (_no_deployments, False, "deployments"),
    (_unknown_field, False, "temperature"),
    (_commented_examples, True, "parse successful"),
], ids=["literal-api-key", "no-models", "no-deployments", "unknown-field", "commented-examples"])
def test_kong_enforces_the_plugin_schema(engine: Any, image: Any, mutate: Callable[[dict[str, Any]], None],
                                         valid: bool, mentions: str) -> None:
    doc = copy.deepcopy(_shipped_config())
    mutate(doc)
    encoded = base64.b64encode(yaml.safe_dump(doc).encode()).decode()
    script = f"echo {encoded} | base64 -d > /tmp/kong.yml && exec kong config parse /tmp/kong.yml"
    container = engine.containers.run(image.id, ["sh", "-c", script], detach=True)
    try:
        status = container.wait(timeout=120)["StatusCode"]
        output = _logs(container)
    finally:
        container.remove(force=True)
    assert (status == 0) is valid, output
    assert mentions in output, output
