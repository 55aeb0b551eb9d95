"""Real Kong 3.9 in front of the plugin server: the image of ``Dockerfile.kong`` (docker SDK) or a local
``kong`` binary (``KONG_BIN`` or PATH), with the same assertions. Each way skips, saying why, when it is not
available here. See ``real_kong.py`` for how each is started (the settings are ``Dockerfile.kong``'s own).

What only a real Kong can show: key-auth, pre-function and rate-limiting really run first and answer in
OpenAI's error shape through ``error_template_json``; nginx really proxies to the listener and streams SSE;
``kong start`` really refuses a bad kong.yml; Kong really respawns a killed plugin server and fails open
while it is gone; ``kong reload`` really replaces plugin instances; two nginx workers really share one
plugin server.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from mock_provider import MockProvider
from real_kong import (
    IMAGE,
    ROOT,
    DockerKong,
    LocalKong,
    Ports,
    RealKong,
    declarative_config,
    local_binary,
    wait_until_serving,
)

pytestmark = [pytest.mark.real_kong, pytest.mark.timeout(1800)]

ALICE = "demo-key-alice"  # kong.yml's demo consumers
PROVIDER_KEY = "real-kong-provider-key-" + secrets.token_hex(8)  # OPENAI_API_KEY of Kong's environment
HELLO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
# Kong's own line on every reload: the old workers' lua-resty-events client loses its broker when nginx closes
# the events socket (Kong/lua-resty-events#43, "because lua-resty-events is using Nginx's unix socket").
KONG_RELOAD_NOISE = re.compile(r"communicate\(\): event worker failed to communicate with broker")


def _mock_alias(name: str, model: str, base: str) -> dict[str, Any]:
    return {"name": name, "deployments": [{"model": model, "api_base": base, "api_key_env": "OPENAI_API_KEY"}]}


def _models(mock: MockProvider) -> list[dict[str, Any]]:
    return [_mock_alias("gpt-mock", "openai/mock-gpt", mock.openai_base),
            _mock_alias("drip", "openai/mock-gpt-drip-100-words-12", mock.openai_base),
            _mock_alias("long-drip", "openai/mock-gpt-drip-200-words-30", mock.openai_base),
            _mock_alias("claude-mock", "anthropic/mock-claude", mock.anthropic_base),
            _mock_alias("hangs", "openai/mock-slow-30000", mock.openai_base),
            _mock_alias("embed-mock", "openai/mock-embed", mock.openai_base)]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProvider]:
    with MockProvider(required_key=PROVIDER_KEY) as provider:
        yield provider


def _docker(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    try:
        import docker

        engine = docker.from_env()
        engine.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine answers ({type(exc).__name__}): the image way needs one")
    if not engine.api.base_url.startswith(("http+docker://localhost", "http+docker://localunixsocket")):
        pytest.skip(f"the Docker engine at {engine.api.base_url} is not local: its host network is not ours")
    try:
        image, _ = engine.images.build(path=str(ROOT), dockerfile="Dockerfile.kong", tag=IMAGE, rm=True)
    except docker.errors.BuildError as exc:
        log = "".join(str(c.get("stream") or c.get("error") or "") for c in exc.build_log)
        pytest.fail(f"docker build -f Dockerfile.kong failed: {exc.msg}\n{log[-8000:]}")
    return engine, image


@pytest.fixture(scope="module")
def receiver() -> Iterator[Any]:
    """An OTLP/HTTP receiver for the traces of the plugin server Kong starts (tracing is on in this tier)."""
    from otlp_receiver import Receiver

    found = Receiver()
    yield found
    found.server.shutdown()


@pytest.fixture(scope="module", params=["image", "binary"])
def kong(request: pytest.FixtureRequest, mock: MockProvider, receiver: Any) -> Iterator[RealKong]:
    ports = Ports()
    doc = declarative_config(ports.listener, mock.base_url, _models(mock))
    _budgets_for_bob_only(doc)
    env = {"OPENAI_API_KEY": PROVIDER_KEY, "LLM_GATEWAY_TRACING": "on", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
           "OTEL_SERVICE_NAME": "llm-gateway-real-kong",
           # Kong's opentelemetry plugin with Kong's tracing off propagates "not sampled": trace anyway
           "OTEL_TRACES_SAMPLER": "always_on"}
    if request.param == "binary":
        binary, reason = local_binary()
        if binary is None:
            pytest.skip(reason)
        started: RealKong = LocalKong(binary, doc, ports, env).start()
    else:
        engine, image = _docker(request)
        started = DockerKong(engine, image, doc, ports, env)
    started.startup_answers = wait_until_serving(started, HELLO, ALICE)  # type: ignore[attr-defined]
    started.doc = doc  # type: ignore[attr-defined]
    started.mock = mock  # type: ignore[attr-defined]
    try:
        yield started
    finally:
        started.stop()


def _budgets_for_bob_only(node: Any) -> None:
    """kong.yml's memory budgets cover every consumer, which pins each to one plugin-server process
    (kong/workers.py): leave alice unbudgeted, so her requests spread over the processes, and bob pinned."""
    if isinstance(node, dict):
        if node.get("name") == "llm-gateway" and isinstance(node.get("config"), dict):
            for budget in node["config"].get("budgets") or ():
                budget["consumers"] = ["bob"]
        for value in node.values():
            _budgets_for_bob_only(value)
    elif isinstance(node, list):
        for value in node:
            _budgets_for_bob_only(value)


def _openai(kong: RealKong, path: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{kong.url}{path}", api_key=ALICE, max_retries=0)


def _is_openai_error(text: str) -> bool:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


# --- starting -----------------------------------------------------------------------------------------------


def test_from_the_first_request_kong_answers_in_openai_shape(kong: RealKong) -> None:
    """While the plugin server imports LiteLLM, requests wait or get a retryable error; never a 403, never
    Kong's bare {"message"} 500."""
    for status, _, text in kong.startup_answers:  # type: ignore[attr-defined]
        assert status != 403, text
        if status not in (0, 200):
            assert status >= 500 and _is_openai_error(text), (status, text)


# --- the front door -------------------------------------------------------------------------------------------


def test_json_and_stream_through_kong_with_the_openai_sdk(kong: RealKong) -> None:
    client = _openai(kong)
    raw = client.chat.completions.with_raw_response.create(model="gpt-mock", messages=HELLO["messages"])
    assert raw.parse().choices[0].message.content.startswith("Hello from mock-gpt")
    assert raw.headers["X-LLM-Provider"] == "openai" and raw.headers["X-RateLimit-Limit-Minute"]
    claude = client.chat.completions.create(model="claude-mock", messages=HELLO["messages"])
    assert claude.choices[0].message.content
    arrivals, text = [], []
    with client.chat.completions.create(model="drip", messages=HELLO["messages"], stream=True) as stream:
        for chunk in stream:
            arrivals.append(time.monotonic())
            text += [c.delta.content or "" for c in chunk.choices]
    assert "".join(text).split() == [f"w{i}" for i in range(1, 13)]
    # 12 words 100 ms apart upstream: they reach the client apart too, not in one burst at the end
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(1 for gap in gaps if gap > 0.05) >= 8, gaps


# --- every endpoint, through Kong's routes ------------------------------------------------------------------


def test_the_model_list_through_kongs_get_route(kong: RealKong) -> None:
    """GET /v1/models and /v1/models/{id} take the llm-models route (its own methods), with the same front door
    and config as the POST endpoints; bob's model_access (kong.yml) shows in his list."""
    client = _openai(kong)
    listed = [m.id for m in client.models.list()]
    assert {"demo", "chat-default", "auto", "gpt-mock", "claude-mock"} <= set(listed)
    demo = client.models.retrieve("demo")
    assert demo.id == "demo" and demo.model_extra["llm_gateway"]["deployments"][0]["provider"] == "demo"
    bob = openai.OpenAI(base_url=f"{kong.url}/v1", api_key="demo-key-bob", max_retries=0)
    assert sorted(m.id for m in bob.models.list()) == ["auto", "chat-default", "demo"]
    with pytest.raises(openai.NotFoundError):
        bob.models.retrieve("gpt-mock")
    response = httpx.delete(f"{kong.url}/v1/models/demo", headers={"apikey": ALICE}, timeout=30)
    assert response.status_code == 404 and _is_openai_error(response.text)  # Kong: no route for DELETE


def test_embeddings_through_kong(kong: RealKong) -> None:
    client = _openai(kong)
    raw = client.embeddings.with_raw_response.create(model="embed-mock", input=["one two", "three"])
    answer = raw.parse()
    assert [d.index for d in answer.data] == [0, 1] and all(len(d.embedding) > 0 for d in answer.data)
    assert answer.usage.prompt_tokens > 0 and raw.headers["X-LLM-Provider"] == "openai"
    assert len(client.embeddings.create(model="demo", input="hi", dimensions=8).data[0].embedding) == 8


def test_anthropic_messages_through_kong_with_the_anthropic_sdk(kong: RealKong) -> None:
    """The Anthropic SDK's own key header and paths, natively to an Anthropic deployment and translated to an
    OpenAI one; errors in Anthropic's shape, Kong's own 401 included (the error template's envelope)."""
    client = anthropic.Anthropic(base_url=kong.url, api_key=ALICE, max_retries=0)
    for alias in ("claude-mock", "gpt-mock"):
        message = client.messages.create(model=alias, max_tokens=64, messages=HELLO["messages"])
        assert message.content[0].text and message.usage.output_tokens > 0
        with client.messages.stream(model=alias, max_tokens=64, messages=HELLO["messages"]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text and final.usage.output_tokens > 0
    assert client.messages.count_tokens(model="claude-mock", messages=HELLO["messages"]).input_tokens > 0
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=8, messages=HELLO["messages"])
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=kong.url, api_key="not-a-key", max_retries=0).messages.create(
            model="demo", max_tokens=8, messages=HELLO["messages"])


def test_the_responses_api_through_kong(kong: RealKong) -> None:
    client = _openai(kong)
    answer = client.responses.create(model="gpt-mock", input="hi", instructions="Be brief.")
    assert answer.output_text and answer.usage.output_tokens > 0
    with client.responses.stream(model="claude-mock", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas and "".join(deltas) == final.output_text
    with pytest.raises(openai.BadRequestError) as stateful:
        client.responses.create(model="gpt-mock", input="hi", previous_response_id="resp_1")
    assert stateful.value.param == "previous_response_id"


def test_legacy_completions_through_kong(kong: RealKong) -> None:
    client = _openai(kong)
    assert client.completions.create(model="demo", prompt="Hello", max_tokens=16).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(model="demo", prompt="Hello", stream=True)
              if c.choices]
    assert "".join(pieces)


def test_a_get_on_a_post_endpoint_is_refused_by_kong_in_openai_shape(kong: RealKong) -> None:
    response = httpx.get(f"{kong.url}/v1/chat/completions", headers={"apikey": ALICE}, timeout=30)
    assert response.status_code == 404 and _is_openai_error(response.text)


@pytest.mark.parametrize("headers", [{"apikey": ALICE}, {"Authorization": f"Bearer {ALICE}"}, {"x-api-key": ALICE}],
                         ids=["apikey", "bearer", "x-api-key"])
def test_each_sdk_way_of_sending_the_key_authenticates(kong: RealKong, headers: dict[str, str]) -> None:
    response = httpx.post(f"{kong.url}/v1/chat/completions", json=HELLO, headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def test_the_consumers_key_never_travels_past_kong(kong: RealKong) -> None:
    marker = secrets.token_hex(6)
    for headers in ({"Authorization": f"Bearer {ALICE}"}, {"x-api-key": ALICE},
                    {"apikey": ALICE, "x-api-key": ALICE, "Authorization": f"Bearer {ALICE}"}):
        httpx.post(f"{kong.url}/echo/v1/chat/completions", json=HELLO, headers={**headers, "X-Marker": marker},
                   timeout=30)
    seen = [r for r in kong.mock.requests if r.headers.get("x-marker") == marker]  # type: ignore[attr-defined]
    assert len(seen) == 3
    for request in seen:
        assert ALICE not in json.dumps(request.headers)
        assert request.headers.get("x-consumer-username") == "alice"


def test_kongs_own_401_and_429_are_openai_errors(kong: RealKong) -> None:
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        openai.OpenAI(base_url=f"{kong.url}/v1", api_key="not-a-key", max_retries=0).chat.completions.create(
            model="demo", messages=HELLO["messages"])
    assert unauthenticated.value.type == "gateway_error" and unauthenticated.value.message
    tight = _openai(kong, "/tight/v1")
    statuses = []
    for _ in range(4):
        try:
            tight.chat.completions.create(model="demo", messages=HELLO["messages"])
            statuses.append(200)
        except openai.RateLimitError as exc:
            statuses.append(429)
            assert exc.type == "gateway_error" and "rate limit" in exc.message.lower()
    assert statuses[:2] == [200, 200] and statuses[2:] == [429, 429]


def test_bodies_up_to_the_limit_pass_and_over_it_are_413(kong: RealKong) -> None:
    for size in (200_000, 900_000):
        body = {"model": "gpt-mock", "messages": [{"role": "user", "content": "x " * (size // 2)}]}
        response = httpx.post(f"{kong.url}/v1/chat/completions", json=body, headers={"apikey": ALICE}, timeout=60)
        assert response.status_code == 200, (size, response.text[:300])
    too_big = {"model": "gpt-mock", "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    response = httpx.post(f"{kong.url}/v1/chat/completions", json=too_big, headers={"apikey": ALICE}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_the_listener_refuses_what_did_not_come_through_kong(kong: RealKong) -> None:
    listener = f"http://127.0.0.1:{kong.ports.listener}/v1/chat/completions"
    body = json.dumps(HELLO).encode()
    status, text = kong.inside_post(listener, body, {"Content-Type": "application/json"})
    assert status == 503 and json.loads(text)["error"]["code"] == "gateway_restarting"  # no ticket: retryable
    status, text = kong.inside_post(listener, body, {"Content-Type": "application/json",
                                                     "X-LLM-Gateway-Ticket": "v3.a.b.c.d.e.f.forged"})
    assert status == 403 and json.loads(text)["error"]["code"] == "gateway_bypass"


def test_provider_keys_reach_the_plugin_server_and_no_key_reaches_its_metrics(kong: RealKong) -> None:
    assert kong.plugin_server_env().get("OPENAI_API_KEY") == PROVIDER_KEY  # through nginx_main_env
    assert httpx.post(f"{kong.url}/v1/chat/completions", json=HELLO, headers={"apikey": ALICE},
                      timeout=30).status_code == 200
    status, metrics = kong.inside_get(f"http://127.0.0.1:{kong.ports.metrics}/metrics")
    assert status == 200
    assert any(line.startswith("llm_gateway_tokens_total{") and 'consumer="alice"' in line
               for line in metrics.splitlines())
    assert ALICE not in metrics and PROVIDER_KEY not in metrics


def test_two_nginx_workers_share_one_plugin_server(kong: RealKong) -> None:
    assert len(kong.worker_pids()) == 2
    with httpx.Client(timeout=30) as http:
        statuses = {http.post(f"{kong.url}/v1/chat/completions", json=HELLO, headers={"apikey": ALICE}).status_code
                    for _ in range(40)}
    assert statuses == {200}


def test_every_plugin_server_process_serves_through_kong(kong: RealKong) -> None:
    """The plugin server forks a worker per extra core; its access phase sends Kong to each in turn with
    kong.service.set_target (kong/workers.py), JSON and streams, except a consumer with memory budgets."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: the plugin server runs one process")
    with httpx.Client(timeout=30) as http:
        answers = [http.post(f"{kong.url}/v1/chat/completions", json=HELLO, headers={"apikey": ALICE})
                   for _ in range(12)]
        pinned = [http.post(f"{kong.url}/v1/chat/completions", json=HELLO, headers={"apikey": "demo-key-bob"})
                  for _ in range(6)]
    assert {r.status_code for r in answers + pinned} == {200}
    assert len({r.headers["X-LLM-Gateway-Process"] for r in answers}) >= 2
    assert len({_stream(kong).headers["X-LLM-Gateway-Process"] for _ in range(4)}) >= 2
    # bob has memory budgets on the route: every request of his goes to the one process whose store charges him
    assert len({r.headers["X-LLM-Gateway-Process"] for r in pinned}) == 1


def _stream(kong: RealKong) -> httpx.Response:
    """A streamed answer through Kong, read to its end."""
    with httpx.stream("POST", f"{kong.url}/v1/chat/completions", json={**HELLO, "stream": True},
                      headers={"apikey": ALICE}, timeout=30) as response:
        body = response.read()
    assert response.status_code == 200 and b"[DONE]" in body, body[:300]
    return response


def test_the_deadline_ends_before_kongs_read_timeout(kong: RealKong) -> None:
    """/short's Service gives up after 4 s; the provider hangs for 30: the client gets the gateway's 504."""
    response = httpx.post(f"{kong.url}/short/v1/chat/completions", json={**HELLO, "model": "hangs"},
                          headers={"apikey": ALICE}, timeout=60)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "provider_timeout"  # the gateway's, not Kong's template


# --- faults and changes ---------------------------------------------------------------------------------------


def test_kill_9_of_the_plugin_server_under_traffic(kong: RealKong) -> None:
    """While it is gone Kong fails closed (502); after Kong respawns it nothing is refused as a bypass, and
    every non-200 on the way is a retryable error in OpenAI's shape."""
    answers: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    r = http.post(f"{kong.url}/v1/chat/completions", json=HELLO, headers={"apikey": ALICE})
                    answers.append((time.monotonic(), r.status_code, r.text[:300]))
                except httpx.HTTPError as exc:
                    answers.append((time.monotonic(), 0, type(exc).__name__))
                time.sleep(0.02)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    killed_at, old_pid = time.monotonic(), kong.kill_plugin_server()
    recovered = None
    while time.monotonic() - killed_at < 45 and recovered is None:
        time.sleep(0.25)
        late = [a for a in answers if a[0] > killed_at + 0.5]
        if len(late) > 20 and all(status == 200 for _, status, _ in late[-20:]):
            recovered = late[-20][0]
    stop.set()
    for thread in threads:
        thread.join()
    assert recovered is not None, f"no recovery in 45 s: {answers[-10:]}"
    assert kong.plugin_server_pid() not in (None, old_pid)
    after = [a for a in answers if a[0] > killed_at]
    assert not [a for a in after if a[1] == 403], "a request that came through Kong was refused as a bypass"
    for _, status, text in after:
        if status != 200:
            assert status in (500, 502, 503) and _is_openai_error(text), (status, text)
    assert recovered - killed_at < 30  # Kong respawns it within a second or so; LiteLLM imports in seconds


def test_kong_reload_with_a_changed_alias_list(kong: RealKong) -> None:
    """kong reload under traffic, with a 6 s stream under way: the new alias is served, the stream through the
    old workers completes, no request in between fails (old workers may still say 404 for the new alias), the
    old instances are closed, and Kong logs no error of ours."""
    log_before = len(kong.error_log())
    doc = json.loads(json.dumps(kong.doc))  # type: ignore[attr-defined]
    gateway = next(p for p in doc["services"][0]["plugins"] if p["name"] == "llm-gateway")
    gateway["config"]["models"].append({"name": "reloaded", "deployments": [{"model": "demo/reloaded"}]})
    stream_words: list[str] = []

    def long_stream() -> None:
        with _openai(kong).chat.completions.create(model="long-drip", messages=HELLO["messages"],
                                                   stream=True) as stream:
            stream_words.extend(c.delta.content or "" for chunk in stream for c in chunk.choices)

    streaming = threading.Thread(target=long_stream)
    streaming.start()
    time.sleep(1)
    kong.reload(doc)
    answers = []
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=30) as http:
        while True:
            response = http.post(f"{kong.url}/v1/chat/completions", json={**HELLO, "model": "reloaded"},
                                 headers={"apikey": ALICE})
            answers.append((response.status_code, response.text[:200]))
            if response.status_code == 200:
                break
            assert time.monotonic() < deadline, answers[-3:]
            time.sleep(0.1)
        answers += [(r.status_code, r.text[:200]) for r in
                    (http.post(f"{kong.url}/v1/chat/completions", json=HELLO, headers={"apikey": ALICE})
                     for _ in range(20))]
    streaming.join(30)
    assert "".join(stream_words).split() == [f"w{i}" for i in range(1, 31)], "the stream across the reload broke"
    for status, text in answers:
        assert status == 200 or (status == 404 and "reloaded" in text) or (status == 503 and _is_openai_error(text)), \
            (status, text)
    time.sleep(1)
    new_lines = kong.error_log()[log_before:]
    assert "closed" in new_lines and "instance" in new_lines, new_lines[-3000:]  # old instances closed
    errors = [line for line in new_lines.splitlines() if ("[error]" in line or "[crit]" in line or "[alert]" in line)
              and not KONG_RELOAD_NOISE.search(line)]
    assert not errors, errors
    kong.reload(kong.doc)  # type: ignore[attr-defined]


def _bad_api_key(doc: dict[str, Any]) -> None:
    gateway = next(p for p in doc["services"][0]["plugins"] if p["name"] == "llm-gateway")
    gateway["config"]["models"][0]["deployments"][0]["api_key"] = "a-literal-value-not-a-vault-reference"


def test_kong_start_refuses_a_bad_kong_yml_naming_the_field(kong: RealKong) -> None:
    bad = declarative_config(kong.ports.listener, "http://127.0.0.1:9", [], mutate=_bad_api_key)
    refused, said = kong.start_refused(bad)
    assert refused, said[-3000:]
    assert "api_key" in said and "should start with: {vault://" in said, said[-3000:]


def test_a_gzip_body_through_kong_is_served_and_brotli_is_415(kong: RealKong) -> None:
    """Kong forwards the compressed bytes as it read them: the ticket binds those, the listener decodes."""
    import gzip

    body = gzip.compress(json.dumps({**HELLO, "model": "gpt-mock"}).encode())
    headers = {"apikey": ALICE, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    response = httpx.post(f"{kong.url}/v1/chat/completions", content=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    response = httpx.post(f"{kong.url}/v1/chat/completions", content=body,
                          headers={**headers, "Content-Encoding": "br"}, timeout=30)
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


def test_error_answers_through_kong_say_whether_to_retry(kong: RealKong) -> None:
    response = httpx.post(f"{kong.url}/v1/chat/completions", json={**HELLO, "model": "no-such-model"},
                          headers={"apikey": ALICE}, timeout=30)
    assert response.status_code == 404 and response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["param"] == "model"


# --- operating it ---------------------------------------------------------------------------------------------


def _smoke(*args: str) -> Any:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT / "kong-plugins")}
    return subprocess.run([sys.executable, "-m", "llm_gateway", "smoke", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_smoke_cli_through_real_kong(kong: RealKong) -> None:
    """The README's first command after `docker compose up`, against a real Kong, and its failures."""
    ready_url = f"http://127.0.0.1:{kong.ports.metrics}/health/ready"
    done = _smoke("--url", kong.url, "--key", ALICE, "--ready-url", ready_url)
    assert done.returncode == 0, done.stdout + done.stderr
    for expected in ("answer: ", "stream: ", "usage: ", "X-Request-ID: ", "X-LLM-Provider: demo",
                     "X-LLM-Deployment: demo#0", "X-LLM-Attempts: 1", "X-RateLimit-Remaining-Minute: ",
                     "X-Kong-Upstream-Latency: "):
        assert expected in done.stdout, (expected, done.stdout)
    assert ALICE not in done.stdout + done.stderr
    wrong = _smoke("--url", kong.url, "--key", "not-a-demo-key")
    assert wrong.returncode == 1 and "Kong refused the key (401" in wrong.stderr, wrong.stderr
    unknown = _smoke("--url", kong.url, "--key", ALICE, "--model", "nope")
    assert unknown.returncode == 1 and "has no model 'nope'" in unknown.stderr, unknown.stderr
    from real_kong import free_port

    down = _smoke("--url", f"http://127.0.0.1:{free_port()}", "--key", ALICE)
    assert down.returncode == 1 and "cannot reach Kong" in down.stderr, down.stderr


def test_the_plugin_server_started_by_kong_is_live_and_ready(kong: RealKong) -> None:
    for which in ("live", "ready"):
        status, text = kong.inside_get(f"http://127.0.0.1:{kong.ports.metrics}/health/{which}")
        assert status == 200, text
        body = json.loads(text)
        assert body["status"] == "ok" and body["phase"] == "serving"  # the current one (a predecessor lets go)


def test_kongs_prometheus_plugin_counts_the_llm_route(kong: RealKong) -> None:
    """kong.yml enables Kong's prometheus plugin globally: the dashboard's kong_* series exist."""
    assert httpx.post(f"{kong.url}/v1/chat/completions", json=HELLO, headers={"apikey": ALICE},
                      timeout=30).status_code == 200
    status, text = kong.inside_get(f"http://127.0.0.1:{kong.ports.admin}/metrics")
    assert status == 200
    assert any(line.startswith("kong_http_requests_total{") and 'route="llm-api"' in line
               and 'code="200"' in line for line in text.splitlines()), text[:2000]
    kong.metric_names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()  # type: ignore[attr-defined]
                         if line and not line.startswith("#")}


def test_the_dashboards_kong_metrics_exist_in_a_real_kong(kong: RealKong) -> None:
    from test_shipped_files import METRIC, dashboard_exprs, exported_names

    assert httpx.post(f"{kong.url}/v1/chat/completions", json=HELLO, headers={"apikey": ALICE},
                      timeout=30).status_code == 200
    status, text = kong.inside_get(f"http://127.0.0.1:{kong.ports.admin}/metrics")
    assert status == 200
    wanted = {name for expr in dashboard_exprs() for name in METRIC.findall(expr) if name.startswith("kong_")}
    assert wanted and not wanted - exported_names(text), sorted(wanted - exported_names(text))


def test_the_compose_stacks_kong_yml_loads_in_real_kong(kong: RealKong) -> None:
    """docker/kong-compose.yml (Redis through an env vault reference, Kong's opentelemetry plugin) is taken by
    `kong start`."""
    import yaml

    doc = yaml.safe_load((ROOT / "docker" / "kong-compose.yml").read_text())
    kong.env["LLM_GATEWAY_REDIS_URL"] = "redis://127.0.0.1:6379/15"  # type: ignore[attr-defined]
    try:
        refused, said = kong.start_refused(doc)
    finally:
        kong.env.pop("LLM_GATEWAY_REDIS_URL")  # type: ignore[attr-defined]
    assert not refused, said[-3000:]


def test_the_clients_traceparent_is_continued_through_real_kong(kong: RealKong, receiver: Any) -> None:
    """Kong forwards the client's W3C traceparent to the listener; the plugin server's request span continues it."""
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    response = httpx.post(f"{kong.url}/v1/chat/completions", json={**HELLO, "model": "gpt-mock"}, timeout=30,
                          headers={"apikey": ALICE, "traceparent": f"00-{trace_id}-{parent}-01"})
    assert response.status_code == 200
    spans = receiver.trace(response.headers["X-Request-ID"], 2, timeout=20)  # the SDK exports every 5 s
    request = [s for s in spans if s["kind"] == 2]
    assert request, f"no span for {response.headers['X-Request-ID']}: {receiver.spans[-3:]}"
    assert request[0]["trace_id"] == trace_id and request[0]["parent"] == parent
    assert request[0]["service"] == "llm-gateway-real-kong"
    assert request[0]["attributes"]["gen_ai.request.model"] == "gpt-mock"
    assert request[0]["attributes"]["llm_gateway.consumer"] == "alice"
    assert [s for s in spans if s["kind"] == 3 and s["parent"] == request[0]["span_id"]]


def test_kongs_opentelemetry_plugin_propagates_and_the_plugin_server_continues_its_trace(
        kong: RealKong, receiver: Any) -> None:
    """With Kong's opentelemetry plugin on, Kong puts its own span between the client's and ours: our request
    span is in the client's trace, and its parent is Kong's span, not the client's."""
    doc = json.loads(json.dumps(kong.doc))  # type: ignore[attr-defined]
    doc.setdefault("plugins", []).append({"name": "opentelemetry", "config": {
        "traces_endpoint": f"{receiver.url}/v1/traces", "propagation": {"default_format": "w3c"}}})
    kong.reload(doc)
    try:
        seen: list[tuple[int, str]] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # the reload's new workers take a moment; old ones forward as is
            trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
            response = httpx.post(f"{kong.url}/v1/chat/completions", json={**HELLO, "model": "gpt-mock"}, timeout=30,
                                  headers={"apikey": ALICE, "traceparent": f"00-{trace_id}-{parent}-01"})
            if response.status_code != 200:
                seen.append((response.status_code, ""))
                time.sleep(0.2)
                continue
            request_id = response.headers["X-Request-ID"]
            spans = [s for s in receiver.trace(request_id, 2, timeout=20)
                     if s["kind"] == 2 and s["attributes"].get("kong.request_id") == request_id]
            assert spans, "no span from the plugin server"
            assert spans[0]["trace_id"] == trace_id, "the client's trace was not continued"
            seen.append((200, spans[0]["parent"]))
            if spans[0]["parent"] not in ("", parent):
                break  # Kong's span is the parent of ours
        else:
            errors = [line for line in kong.error_log().splitlines() if "[error]" in line or "[crit]" in line]
            raise AssertionError(f"Kong's opentelemetry plugin never put its span in between: {seen[-5:]}\n"
                                 f"{errors[-10:]}")
    finally:
        kong.reload(kong.doc)  # type: ignore[attr-defined]
