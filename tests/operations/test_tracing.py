"""OpenTelemetry traces (``operations/tracing.py``): a real plugin server with LLM_GATEWAY_TRACING=on exports over
OTLP/HTTP to a real local receiver (this module's), which decodes what the SDK sent."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import ALICE_KEY, PROVIDER_KEY, free_port, route_to
from kong_harness import KongHarness, PluginServerProcess, start_plugin_server
from mock_provider import MockProvider
from otlp_receiver import Receiver

HELLO = [{"role": "user", "content": "hello"}]
SERVER, CLIENT = 2, 3  # Span.SpanKind values


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()


@pytest.fixture(scope="module")
def traced_server(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[PluginServerProcess]:
    path = tmp_path_factory.mktemp("traced") / "llm-gateway.sock"
    server = start_plugin_server(str(path), f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", env={
        "MOCK_PROVIDER_KEY": PROVIDER_KEY, "LLM_GATEWAY_METRICS_LISTEN": "off", "LLM_GATEWAY_TRACING": "on",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "llm-gateway-test"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def traced(traced_server: PluginServerProcess, mock_provider: MockProvider) -> Iterator[KongHarness]:
    oa = mock_provider.openai_base

    def alias(name: str, model: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "deployments": [{"model": model, "api_base": oa, "api_key_env": "MOCK_PROVIDER_KEY"}],
                **extra}

    config = {"routing": {"retries": 0, "backoff_initial": 0.01},
              "models": [alias("gpt-mock", "openai/mock-gpt"),
                         alias("flaky", "openai/mock-err-500", fallbacks=["gpt-mock"]),
                         {"name": "two", "deployments": [
                             {"name": "down", "model": "openai/mock-gpt", "api_key_env": "MOCK_PROVIDER_KEY",
                              "api_base": f"http://127.0.0.1:{free_port()}/v1"},
                             {"name": "up", "model": "openai/mock-gpt", "api_key_env": "MOCK_PROVIDER_KEY",
                              "api_base": oa}], "strategy": "priority"}]}
    with route_to(traced_server, config) as harness:
        yield harness


def _post(kong: KongHarness, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{kong.url}/v1/chat/completions", json=body, timeout=30,
                      headers={"apikey": ALICE_KEY, **(headers or {})})


def test_a_request_span_continues_the_callers_traceparent_with_gen_ai_attributes(
        traced: KongHarness, receiver: Receiver) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    response = _post(traced, {"model": "gpt-mock", "messages": HELLO, "max_tokens": 50, "temperature": 0.5},
                     {"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert response.status_code == 200
    spans = receiver.trace(response.headers["X-Request-ID"], 2)
    (request,) = [s for s in spans if s["kind"] == SERVER]
    (attempt,) = [s for s in spans if s["kind"] == CLIENT]
    assert request["trace_id"] == trace_id and request["parent"] == parent_id, "the trace was restarted"
    assert request["service"] == "llm-gateway-test" and request["name"] == "chat gpt-mock"
    a = request["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.system"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-mock" and a["gen_ai.response.model"].startswith("mock-gpt")
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.request.max_tokens"] == 50 and a["gen_ai.request.temperature"] == 0.5
    assert a["llm_gateway.consumer"] == "alice" and a["llm_gateway.alias"] == "gpt-mock"
    assert a["llm_gateway.deployment"] == "gpt-mock#0" and a["llm_gateway.attempts"] == 1
    assert a["http.response.status_code"] == 200 and not request["events"]
    assert attempt["parent"] == request["span_id"] and attempt["trace_id"] == trace_id
    assert attempt["name"] == "chat mock-gpt" and attempt["attributes"]["gen_ai.system"] == "openai"
    assert attempt["attributes"]["llm_gateway.deployment"] == "gpt-mock#0"


def test_without_a_traceparent_a_new_trace_begins(traced: KongHarness, receiver: Receiver) -> None:
    response = _post(traced, {"model": "gpt-mock", "messages": HELLO})
    (request,) = [s for s in receiver.trace(response.headers["X-Request-ID"], 2) if s["kind"] == SERVER]
    assert request["parent"] == "" and len(request["trace_id"]) == 32


def test_a_fallback_and_a_retry_are_events_and_each_attempt_its_own_span(traced: KongHarness,
                                                                          receiver: Receiver) -> None:
    fell_back = _post(traced, {"model": "flaky", "messages": HELLO})
    assert fell_back.status_code == 200 and fell_back.headers["X-LLM-Fallback"] == "gpt-mock"
    spans = receiver.trace(fell_back.headers["X-Request-ID"], 3)
    (request,) = [s for s in spans if s["kind"] == SERVER]
    attempts = sorted((s for s in spans if s["kind"] == CLIENT), key=lambda s: s["attributes"]["llm_gateway.attempt"])
    assert [s["attributes"]["llm_gateway.alias"] for s in attempts] == ["flaky", "gpt-mock"]
    assert attempts[0]["status"] == 2 and attempts[0]["attributes"]["error.type"] == "provider_error"  # ERROR
    assert attempts[1]["status"] != 2
    assert [name for name, _ in request["events"]] == ["llm_gateway.fallback"]
    assert request["events"][0][1]["llm_gateway.previous_error"] == "provider_error"
    assert request["attributes"]["llm_gateway.fallback"] == "gpt-mock"
    retried = _post(traced, {"model": "two", "messages": HELLO})
    assert retried.status_code == 200 and retried.headers["X-LLM-Deployment"] == "up"
    spans = receiver.trace(retried.headers["X-Request-ID"], 3)
    (request,) = [s for s in spans if s["kind"] == SERVER]
    assert [name for name, _ in request["events"]] == ["llm_gateway.retry"]
    assert request["events"][0][1]["llm_gateway.deployment"] == "up"


def test_a_stream_span_covers_the_stream_and_a_failure_is_an_error(traced: KongHarness, receiver: Receiver) -> None:
    with httpx.stream("POST", f"{traced.url}/v1/chat/completions", timeout=30, headers={"apikey": ALICE_KEY},
                      json={"model": "gpt-mock", "messages": HELLO, "stream": True}) as response:
        request_id = response.headers["X-Request-ID"]
        assert "[DONE]" in response.read().decode()
    (request,) = [s for s in receiver.trace(request_id, 2) if s["kind"] == SERVER]
    a = request["attributes"]
    assert a["llm_gateway.stream"] is True and a["llm_gateway.ttft_ms"] > 0
    assert a["gen_ai.response.finish_reasons"] == ["stop"] and a["gen_ai.usage.output_tokens"] > 0
    unknown = _post(traced, {"model": "no-such-model", "messages": HELLO})
    assert unknown.status_code == 404
    (refused,) = receiver.trace(unknown.headers["X-Request-ID"], 1)
    assert refused["attributes"]["http.response.status_code"] == 404
    assert refused["attributes"]["error.type"] == "model_not_found"


def test_no_secret_and_no_prompt_in_any_span(traced: KongHarness, receiver: Receiver) -> None:
    marker = "prompt-marker-" + secrets.token_hex(6)
    response = _post(traced, {"model": "gpt-mock", "messages": [{"role": "user", "content": marker}]})
    receiver.trace(response.headers["X-Request-ID"], 2)
    exported = b"".join(receiver.raw)
    for secret in (PROVIDER_KEY, ALICE_KEY, marker):
        assert secret.encode() not in exported
    assert not [s for s in receiver.spans if "v3." in json.dumps(s["attributes"])], "a ticket reached a span"


def test_tracing_is_off_by_default_and_its_hooks_do_nothing() -> None:
    from llm_gateway.operations import tracing

    assert not tracing.enabled()
    assert tracing.configure({}) is False
    tracing.start_request({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, "r1")
    assert tracing._current.get() is None

    async def call(deployment: Any) -> str:
        return "x"

    assert tracing.traced_call(call) is call  # the router's call is not even wrapped


def test_the_untraced_server_says_nothing_about_tracing(plugin_server: PluginServerProcess) -> None:
    assert "tracing on" not in plugin_server.stderr_text()


def test_a_tracing_failure_never_reaches_the_request() -> None:
    """A bug inside a hook is one warning line, not an exception in the listener (a copy of the module, so this
    process's own stays off)."""
    import importlib.util

    import llm_gateway.operations.tracing

    spec = importlib.util.find_spec("llm_gateway.operations.tracing")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)  # type: ignore[union-attr]

    class Dropping:
        def export(self, spans: Any) -> Any:
            from opentelemetry.sdk.trace.export import SpanExportResult

            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    assert copy.configure({}, exporter=Dropping()) and not llm_gateway.operations.tracing.enabled()
    copy._tracer = None  # every span start now raises inside the hooks
    copy.start_request({}, "r1")
    copy.attempt("a", type("D", (), {"model": "openai/x", "id": "a#0"})())
    copy.finish_request(object(), {})
    copy.end_request(200)
    copy.shutdown()
