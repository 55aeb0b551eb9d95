"""accounting/metrics.py: what observe() counts, label hygiene and cardinality, the /metrics server, and multiprocess
mode (several processes, one scrape that shows their sum)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llm_gateway.accounting.metrics import OTHER, Metrics, label_value, start_metrics_server
from llm_gateway.accounting.records import UsageRecord
from llm_gateway.accounting.tokens import TokenUsage

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "kong-plugins"


def _record(**changes) -> UsageRecord:
    fields = dict(request_id="r", consumer="alice", consumer_id="8f3a", route=None, alias="chat", provider="openai",
                  model="gpt-4o-mini", stream=False, status=200, error_code=None,
                  usage=TokenUsage(prompt=100, completion=20, total=120, cached=30, reasoning=5, estimated=False),
                  cost_usd=0.002, latency_ms=1500.0, ttft_ms=None)
    fields.update(changes)
    return UsageRecord(**fields)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a text exposition, by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(all_samples: dict, name: str, **labels: str) -> float | None:
    return all_samples.get((name, frozenset(labels.items())))


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    return samples(generate_latest(metrics.registry).decode())


def test_observe_counts_requests_tokens_cost_and_latencies() -> None:
    metrics = Metrics()
    metrics.observe(_record(), overhead_s=0.002)
    metrics.observe(_record(stream=True, latency_ms=800.0, ttft_ms=120.0, cost_usd=0.001,
                            usage=TokenUsage(50, 10, 60, 0, 0, True)), overhead_s=0.004)
    metrics.observe(_record(status=502, error_code="provider_error", usage=None, cost_usd=None, latency_ms=30.0))
    metrics.observe(_record(consumer="bob", stream=True, status=499, truncated=True, ttft_ms=90.0, latency_ms=900.0,
                            usage=TokenUsage(40, 3, 43, 0, 0, True), cost_usd=None))
    s = scrape(metrics)
    who = dict(consumer="alice", alias="chat", provider="openai", model="gpt-4o-mini")
    assert value(s, "llm_gateway_requests_total", **who, status="200") == 2
    assert value(s, "llm_gateway_requests_total", **who, status="502") == 1
    assert value(s, "llm_gateway_requests_total", **{**who, "consumer": "bob"}, status="499") == 1
    assert value(s, "llm_gateway_tokens_total", **who, kind="prompt") == 150
    assert value(s, "llm_gateway_tokens_total", **who, kind="completion") == 30
    assert value(s, "llm_gateway_tokens_total", **who, kind="cached") == 30
    assert value(s, "llm_gateway_tokens_total", **who, kind="reasoning") == 5
    assert value(s, "llm_gateway_tokens_total", **{**who, "consumer": "bob"}, kind="prompt") == 40
    assert value(s, "llm_gateway_cost_usd_total", **who) == pytest.approx(0.003)
    assert value(s, "llm_gateway_cost_usd_total", **{**who, "consumer": "bob"}) is None  # unknown cost: not 0
    where = dict(alias="chat", provider="openai")
    assert value(s, "llm_gateway_request_duration_seconds_count", **where, stream="false") == 2
    assert value(s, "llm_gateway_request_duration_seconds_sum", **where, stream="false") == pytest.approx(1.53)
    assert value(s, "llm_gateway_request_duration_seconds_bucket", **where, stream="true", le="1.0") == 2
    assert value(s, "llm_gateway_time_to_first_token_seconds_count", **where) == 2
    assert value(s, "llm_gateway_time_to_first_token_seconds_sum", **where) == pytest.approx(0.21)
    assert value(s, "llm_gateway_overhead_seconds_count", **where) == 2
    assert value(s, "llm_gateway_overhead_seconds_bucket", **where, le="0.002") == 1
    assert value(s, "llm_gateway_estimated_usage_total", **where) == 2
    assert value(s, "llm_gateway_truncated_streams_total", **where) == 1


def test_budget_fallback_and_cooldown_counters() -> None:
    metrics = Metrics()
    metrics.budget_rejected("bob", "daily-tokens")
    metrics.budget_rejected("bob", "daily-tokens")
    metrics.fallback("chat", "openai", "anthropic")
    metrics.cooldown("chat", "openai/gpt-4o-mini")
    s = scrape(metrics)
    assert value(s, "llm_gateway_budget_rejections_total", consumer="bob", budget="daily-tokens") == 2
    assert value(s, "llm_gateway_fallbacks_total", alias="chat", from_provider="openai", to_provider="anthropic") == 1
    assert value(s, "llm_gateway_cooldowns_total", alias="chat", deployment="openai/gpt-4o-mini") == 1


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # no "Duplicated timeseries" error
    first.observe(_record())
    assert value(scrape(second), "llm_gateway_requests_total", consumer="alice", alias="chat", provider="openai",
                 model="gpt-4o-mini", status="200") is None
    assert b"llm_gateway_" not in generate_latest(prometheus_client.REGISTRY)
    registry = CollectorRegistry()
    assert Metrics(registry).registry is registry


def test_label_values_are_sanitised() -> None:
    assert label_value("ok-name_1.2") == "ok-name_1.2"
    assert label_value("evil\nname\r\x00") == "evil_name__"
    assert label_value("x" * 500) == "x" * 128
    assert label_value("https://user:s3cret@api.example.com/v1") == "https://api.example.com/v1"
    assert label_value(None) == "" and label_value(429) == "429"
    metrics = Metrics()
    metrics.observe(_record(consumer="mallory\n# HELP fake", alias="a" * 300, model='quote"d'))
    metrics.observe(_record(consumer=None))
    text = generate_latest(metrics.registry).decode()
    assert "mallory_# HELP fake" in text and "\n# HELP fake" not in text
    assert "a" * 129 not in text
    s = samples(text)
    assert value(s, "llm_gateway_requests_total", consumer="anonymous", alias="chat", provider="openai",
                 model="gpt-4o-mini", status="200") == 1


def test_consumer_and_model_cardinality_is_capped() -> None:
    metrics = Metrics(max_consumers=2, max_models=1)
    for consumer in ("c1", "c2", "c3", "c4", "c1"):
        metrics.observe(_record(consumer=consumer))
    metrics.observe(_record(consumer="c1", model="another-model"))
    s = scrape(metrics)
    base = dict(alias="chat", provider="openai", status="200")
    assert value(s, "llm_gateway_requests_total", consumer="c1", model="gpt-4o-mini", **base) == 2
    assert value(s, "llm_gateway_requests_total", consumer="c2", model="gpt-4o-mini", **base) == 1
    assert value(s, "llm_gateway_requests_total", consumer=OTHER, model="gpt-4o-mini", **base) == 2
    assert value(s, "llm_gateway_requests_total", consumer="c1", model=OTHER, **base) == 1


def test_observe_never_raises() -> None:
    metrics = Metrics()
    metrics.observe(_record(cost_usd=float("nan"), latency_ms=-1.0, ttft_ms=-5.0), overhead_s=-1.0)
    metrics.observe(_record(status="weird"))  # type: ignore[arg-type]
    s = scrape(metrics)
    assert value(s, "llm_gateway_requests_total", consumer="alice", alias="chat", provider="openai",
                 model="gpt-4o-mini", status="weird") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def test_metrics_server_serves_the_registry() -> None:
    metrics = Metrics()
    metrics.observe(_record())
    port = _free_port()
    server = start_metrics_server("127.0.0.1", port, metrics)
    try:
        s = samples(_get(f"http://127.0.0.1:{port}/metrics"))
        assert value(s, "llm_gateway_tokens_total", consumer="alice", alias="chat", provider="openai",
                     model="gpt-4o-mini", kind="prompt") == 100
        metrics.observe(_record())  # live values, not a snapshot
        s = samples(_get(f"http://127.0.0.1:{port}/metrics"))
        assert value(s, "llm_gateway_tokens_total", consumer="alice", alias="chat", provider="openai",
                     model="gpt-4o-mini", kind="prompt") == 200
        with pytest.raises(OSError):  # a taken port is the caller's to report
            start_metrics_server("127.0.0.1", port, metrics)
    finally:
        server.shutdown()
        server.server_close()


WORKER = textwrap.dedent("""
    import sys
    from llm_gateway.accounting.records import UsageRecord
    from llm_gateway.accounting.tokens import TokenUsage
    from llm_gateway.accounting.metrics import Metrics, start_metrics_server

    count, port = int(sys.argv[1]), int(sys.argv[2])
    metrics = Metrics()
    assert metrics.multiprocess
    for i in range(count):
        metrics.observe(UsageRecord(
            request_id=str(i), consumer="alice", consumer_id=None, route=None, alias="chat", provider="openai",
            model="gpt-4o-mini", stream=False, status=200, error_code=None,
            usage=TokenUsage(10, 2, 12, 0, 0, False), cost_usd=0.5, latency_ms=100.0, ttft_ms=None),
            overhead_s=0.001)
    metrics.budget_rejected("bob", "daily")
    if port:
        start_metrics_server("127.0.0.1", port, metrics)
        print("ready", flush=True)
        sys.stdin.readline()  # serve until the test is done
    print("done", flush=True)
""")


def test_multiprocess_mode_one_scrape_shows_every_process(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGIN_DIR), os.environ.get("PYTHONPATH")])),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", WORKER, "2", str(port)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        other = subprocess.run([sys.executable, "-c", WORKER, "3", "0"], env=env, text=True, capture_output=True,
                               timeout=60)
        assert other.returncode == 0 and other.stdout.strip() == "done", other.stderr  # exited: its counts remain
        assert server.stdout.readline().strip() == "ready"
        s = samples(_get(f"http://127.0.0.1:{port}/metrics"))
        who = dict(consumer="alice", alias="chat", provider="openai", model="gpt-4o-mini")
        assert value(s, "llm_gateway_requests_total", **who, status="200") == 5
        assert value(s, "llm_gateway_tokens_total", **who, kind="prompt") == 50
        assert value(s, "llm_gateway_cost_usd_total", **who) == pytest.approx(2.5)
        assert value(s, "llm_gateway_request_duration_seconds_count", alias="chat", provider="openai",
                     stream="false") == 5
        assert value(s, "llm_gateway_overhead_seconds_bucket", alias="chat", provider="openai", le="+Inf") == 5
        assert value(s, "llm_gateway_budget_rejections_total", consumer="bob", budget="daily") == 2
        assert len(list(tmp_path.glob("*.db"))) >= 2  # one file per process and metric type
    finally:
        if server.poll() is None:
            server.stdin.write("\n")
            server.stdin.flush()
        try:
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
    assert server.returncode == 0


def test_answered_counts_answers_without_a_record() -> None:
    metrics = Metrics(max_consumers=2)
    metrics.answered(403)  # no ticket: nobody vouched for a consumer
    metrics.answered(404, consumer="alice")
    metrics.answered(400, consumer="", alias="gpt-mock")  # a route without authentication
    metrics.answered(413, consumer="bob")  # past the consumer cap
    s = scrape(metrics)

    def requests(**labels: str) -> float | None:
        return value(s, "llm_gateway_requests_total", provider="", model="", **labels)
    assert requests(consumer="", alias="", status="403") == 1
    assert requests(consumer="alice", alias="", status="404") == 1
    assert requests(consumer="anonymous", alias="gpt-mock", status="400") == 1
    assert requests(consumer=OTHER, alias="", status="413") == 1
