"""The files we ship are checked like code: every declarative kong.yml and every YAML example in the README and
docs parses and our plugin's config in it validates against our schema (``declarative_check``); the compose
stack is valid (``docker compose config`` when a Compose CLI answers; the Compose Specification's JSON schema
and a structural check always); the Grafana
dashboard asks only for metrics the plugin server really exports (a live scrape); the generated configuration
reference is the committed one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import ALICE_KEY
from kong_harness import KongHarness, PluginServerProcess, _plugin_env
from llm_gateway import PLUGIN_NAME
from llm_gateway.kong.declarative_check import check_file, check_plugin_config

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "llm-gateway.json"
MARKDOWN = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
YAML_BLOCK = re.compile(r"^( *)```ya?ml\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
METRIC = re.compile(r"\b((?:llm_gateway|kong)_[a-z_]+)\b")


def declarative_files() -> list[Path]:
    """Every decK file of the repository (a YAML file with ``_format_version``)."""
    found = []
    for path in sorted([*ROOT.glob("*.yml"), *ROOT.glob("*.yaml"), *DOCKER.rglob("*.yml"), *DOCKER.rglob("*.yaml")]):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and "_format_version" in doc:
            found.append(path)
    return found


def test_the_declarative_files_are_found() -> None:
    assert {p.relative_to(ROOT).as_posix() for p in declarative_files()} >= {"kong.yml", "docker/kong-compose.yml"}


@pytest.mark.parametrize("path", declarative_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_declarative_file_validates_against_our_schema(path: Path) -> None:
    count, problems = check_file(path)
    assert not problems, problems
    assert count >= 1, f"{path} has no {PLUGIN_NAME} entry"


def _without_compose_additions(doc: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    doc["plugins"] = [p for p in doc.get("plugins", []) if p["name"] != "opentelemetry"]
    for service in doc["services"]:
        for plugin in service.get("plugins", []):
            if plugin["name"] == PLUGIN_NAME:
                plugin["config"].pop("redis", None)
    return doc


def test_the_compose_kong_yml_is_kong_yml_with_redis_and_opentelemetry() -> None:
    shipped = yaml.safe_load((ROOT / "kong.yml").read_text())
    compose = yaml.safe_load((DOCKER / "kong-compose.yml").read_text())
    assert _without_compose_additions(compose) == shipped, "docker/kong-compose.yml drifted from kong.yml"
    gateway = next(p for p in compose["services"][0]["plugins"] if p["name"] == PLUGIN_NAME)
    assert gateway["config"]["redis"]["url"] == "{vault://env/llm-gateway-redis-url}"
    otel = next(p for p in compose["plugins"] if p["name"] == "opentelemetry")
    assert otel["config"]["traces_endpoint"].startswith("http://jaeger:4318/")


def yaml_examples() -> list[tuple[str, str]]:
    examples = []
    for path in MARKDOWN:
        for i, match in enumerate(YAML_BLOCK.finditer(path.read_text())):
            examples.append((f"{path.relative_to(ROOT).as_posix()}#{i}", textwrap.dedent(match.group(2))))
    return examples


def _plugin_configs(node: Any) -> list[Any]:
    """Our plugin's configs anywhere in a parsed example."""
    found = []
    if isinstance(node, dict):
        if node.get("name") == PLUGIN_NAME and "config" in node:
            found.append(node["config"])
        for value in node.values():
            found += _plugin_configs(value)
    elif isinstance(node, list):
        for item in node:
            found += _plugin_configs(item)
    return found


def test_the_docs_have_yaml_examples_of_our_config() -> None:
    with_config = [name for name, text in yaml_examples() if _plugin_configs(yaml.safe_load(text))]
    assert {"README.md#0", "docs/architecture.md#0", "docs/migration.md#1", "docs/migration.md#2",
            "docs/migration.md#4"} <= set(with_config), with_config


@pytest.mark.parametrize(("where", "text"), yaml_examples(), ids=[name for name, _ in yaml_examples()])
def test_every_yaml_example_in_the_docs_parses_and_our_config_in_it_validates(where: str, text: str) -> None:
    doc = yaml.safe_load(text)
    for config in _plugin_configs(doc):
        assert not check_plugin_config(config), (where, check_plugin_config(config))


# -- the compose stack ---------------------------------------------------------------------------------------------
def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def _compose_cli() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True,
                                                       timeout=30).returncode == 0:
            return command
    return None


def test_docker_compose_config_accepts_the_stack() -> None:
    command = _compose_cli()
    if command is None:
        pytest.skip("no Compose CLI answers here (docker compose / docker-compose); the structural check runs")
    result = subprocess.run([*command, "-f", str(DOCKER / "compose.yml"), "config", "--quiet"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_compose_file_validates_against_the_compose_specification() -> None:
    """The Compose Specification's JSON schema (as check-jsonschema vendors it): what `docker compose config`
    would refuse as a malformed file (unknown keys, wrong types), without a Docker CLI."""
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(DOCKER / "compose.yml")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_stack_structure() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"kong", "redis", "prometheus", "grafana", "jaeger", "traffic"}
    for name, service in services.items():
        assert "image" in service, name
        check = service.get("healthcheck", {}).get("test")
        assert check and check[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        for port in service.get("ports", []):
            published = str(port)
            if name == "kong" and published == "8000:8000":
                continue  # the proxy: the one port meant for clients
            assert published.startswith("127.0.0.1:"), f"{name} publishes {published} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (DOCKER / source).exists(), f"{name} mounts {source}, which does not exist"
    kong = services["kong"]
    assert (DOCKER / kong["build"]["context"] / kong["build"]["dockerfile"]).exists()
    assert kong["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "./kong-compose.yml:/kong/kong.yml:ro" in kong["volumes"]
    env = kong["environment"]
    assert env["LLM_GATEWAY_REDIS_URL"].startswith("redis://redis:6379/")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert "kong-llm-gateway health" in " ".join(kong["healthcheck"]["test"])
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    traffic = services["traffic"]
    assert traffic["image"] == kong["image"] and traffic["depends_on"]["kong"]["condition"] == "service_healthy"
    assert "kong-llm-gateway smoke --url http://kong:8000" in traffic["command"][0]


def test_prometheus_scrapes_the_plugin_server_and_kong_and_grafana_is_provisioned() -> None:
    compose = _compose()
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    env = compose["services"]["kong"]["environment"]
    assert targets["llm-gateway"] == ["kong:9542"]  # LLM_GATEWAY_METRICS_LISTEN=0.0.0.0:9542 in the image
    assert targets["kong"] == [f"kong:{env['KONG_STATUS_LISTEN'].rsplit(':', 1)[1]}"]
    provisioning = DOCKER / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "datasources.yml").read_text())["datasources"]
    uids = {s["uid"]: s for s in sources}
    assert uids["prometheus"]["url"] == "http://prometheus:9090" and uids["jaeger"]["url"] == "http://jaeger:16686"
    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids and panel["targets"], panel["title"]


# -- the dashboard against a live scrape -----------------------------------------------------------------------
def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def exported_names(text: str) -> set[str]:
    """The sample names a Prometheus text exposition can hold: the samples seen, and those its TYPE lines
    announce (a labelled counter nobody incremented yet has no sample)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"} if kind == "histogram" else {name}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_dashboard_covers_what_the_issue_asks_for() -> None:
    exprs = " ".join(dashboard_exprs())
    for metric in ("llm_gateway_tokens_total", "llm_gateway_cost_usd_total", "llm_gateway_requests_total",
                   "llm_gateway_request_duration_seconds_bucket", "llm_gateway_time_to_first_token_seconds_bucket",
                   "llm_gateway_overhead_seconds_bucket", "llm_gateway_fallbacks_total", "llm_gateway_cooldowns_total",
                   "llm_gateway_budget_rejections_total", "kong_http_requests_total"):
        assert metric in exprs, metric
    assert "by (consumer, model)" in exprs and "by (status)" in exprs
    for expr in dashboard_exprs():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_the_dashboard_asks_only_for_metrics_the_plugin_server_exports(
        kong: KongHarness, plugin_server: PluginServerProcess) -> None:
    for model, stream in (("gpt-mock", False), ("gpt-mock", True)):
        httpx.post(f"{kong.url}/v1/chat/completions", timeout=30, headers={"apikey": ALICE_KEY},
                   json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    scrape = httpx.get(f"http://{plugin_server.metrics}/metrics", timeout=10).text  # type: ignore[attr-defined]
    exported = exported_names(scrape)
    wanted = {name for expr in dashboard_exprs() for name in METRIC.findall(expr)}
    ours = {name for name in wanted if name.startswith("llm_gateway_")}
    assert ours and not ours - exported, f"not exported by the plugin server: {sorted(ours - exported)}"
    # kong_* names are Kong's prometheus plugin's: tests/kong/test_real_kong.py checks them against a real Kong
    assert wanted - ours <= {name for name in wanted if name.startswith("kong_")}


# -- the generated configuration reference -------------------------------------------------------------------------
def test_the_configuration_reference_is_the_generated_one() -> None:
    generated = subprocess.run([sys.executable, "-m", "llm_gateway", "docs", "config"], env=_plugin_env(None),
                               capture_output=True, text=True, check=True).stdout
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == generated, ("docs/configuration.md is stale: run "
                                    "`kong-llm-gateway docs config > docs/configuration.md`")


def test_the_reference_names_every_schema_field() -> None:
    from llm_gateway.kong.schema import CONFIG_FIELDS
    from llm_gateway.operations.docs_reference import configuration_reference

    reference = configuration_reference()

    def names(fields: list[dict[str, Any]]) -> list[str]:
        out = []
        for entry in fields:
            ((name, spec),) = entry.items()
            out.append(name)
            inner = spec.get("fields") or (spec.get("elements") or {}).get("fields") or []
            out += names(inner)
        return out

    for name in names(CONFIG_FIELDS):
        assert f"| `{name}` |" in reference, name
