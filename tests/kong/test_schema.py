"""The plugin as Kong loads it: query_cmd output, the config schema, and the shipped kong.yml."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_gateway.config import ConfigError, parse_config
from llm_gateway.kong.schema import kong_schema
from llm_gateway.kong.schema_validation import validate_plugin_config

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"models": [{"name": "chat", "deployments": [{"model": "openai/gpt-4o-mini", "api_key_env": "OPENAI_KEY"}]}]}


def _dump() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_gateway", "dump"], capture_output=True, text=True,
                          check=True, cwd=ROOT)


def test_query_cmd_prints_exactly_what_kong_decodes() -> None:
    out = _dump()
    info = json.loads(out.stdout)  # process.lua decodes the whole of stdout
    assert isinstance(info, list) and len(info) == 1  # Kong 3.9 reads only the first entry
    entry = info[0]
    assert set(entry) == {"Name", "Priority", "Version", "Schema", "Phases"}
    assert entry["Name"] == "llm-gateway"
    assert isinstance(entry["Priority"], int) and entry["Priority"] < 910  # runs after rate-limiting
    assert re.fullmatch(r"\d+\.\d+\.\d+", entry["Version"])
    assert entry["Phases"] == ["access"]  # "response" would make Kong buffer streams
    assert entry["Schema"]["name"] == "llm-gateway"
    assert out.stderr == ""


def test_query_cmd_does_not_import_litellm() -> None:
    """query_cmd runs in every Kong process that loads schemas: it must not pay LiteLLM's 3-4 s import."""
    code = ("import sys, io, contextlib; from llm_gateway.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['dump'])\n"
            "print('litellm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_schema_descriptions_fit_kongs_metaschema() -> None:
    """Kong's metaschema wants descriptions of 10 to 500 characters."""
    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("description"), str):
                assert 10 <= len(node["description"]) <= 500
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(kong_schema())


def test_good_config_gets_kongs_defaults() -> None:
    filled, errors = validate_plugin_config(kong_schema(), GOOD)
    assert errors is None
    assert filled["max_body_bytes"] == 1048576
    assert filled["models"][0]["deployments"][0]["timeout"] == 60


def _with(path: list[str | int], value: object) -> dict:
    config = copy.deepcopy(GOOD)
    node = config
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return config


DEPLOYMENT = ["models", 0, "deployments", 0]
REJECTED = [
    ("no models", _with(["models"], KeyError), {"models": "required field missing"}),
    ("empty models", _with(["models"], []), {"models": "length must be at least 1"}),
    ("alias without deployments", _with(["models", 0, "deployments"], []), None),
    ("deployment without model", _with([*DEPLOYMENT, "model"], KeyError), None),
    ("literal api key", _with([*DEPLOYMENT, "api_key"], "a-literal-value-not-a-vault-reference"), None),
    ("negative timeout", _with([*DEPLOYMENT, "timeout"], -1), None),
    ("timeout as text", _with([*DEPLOYMENT, "timeout"], "soon"), None),
    ("bad env var name", _with([*DEPLOYMENT, "api_key_env"], "OPENAI KEY"), None),
    ("body limit too small", _with(["max_body_bytes"], 10), None),
    ("unknown field", _with(["modles"], []), {"modles": "unknown field"}),
    ("alias name with spaces", _with(["models", 0, "name"], "my model"), None),
    ("alias with neither deployments nor a complexity route", _with(["models", 0, "deployments"], KeyError),
     {"models": {1: {"@entity": ["at least one of these fields must be non-empty: 'deployments', "
                                 "'route_by_complexity'"]}}}),
    ("alias with both deployments and a complexity route",
     _with(["models", 0, "route_by_complexity"], {"strong": "a", "weak": "b"}),
     {"models": {1: {"@entity": ["only one or none of these fields must be set: 'deployments', "
                                 "'route_by_complexity'"]}}}),
    ("unknown strategy", _with(["models", 0, "strategy"], "round-robin"), None),
    ("zero weight", _with([*DEPLOYMENT, "weight"], 0), None),
    ("too many retries", _with(["routing"], {"retries": 11}), None),
    ("complexity threshold above 1", _with(["models", 0], {"name": "auto", "route_by_complexity": {
        "strong": "a", "weak": "b", "threshold": 1.5}}), None),
    ("model access without consumers", _with(["model_access"], [{"models": ["chat"]}]), None),
]


@pytest.mark.parametrize(("case", "config", "expected"), REJECTED, ids=[c[0] for c in REJECTED])
def test_kong_refuses_bad_configs(case: str, config: dict, expected: dict | None) -> None:
    filled, errors = validate_plugin_config(kong_schema(), config)
    assert filled is None, f"{case} was accepted"
    if expected is not None:
        assert errors == expected


def test_vault_reference_is_accepted_and_literal_refused() -> None:
    ok, _ = validate_plugin_config(kong_schema(), _with([*DEPLOYMENT, "api_key"], "{vault://env/openai-key}"))
    assert ok is not None


def test_parse_config_repeats_what_kong_cannot_express() -> None:
    twice = copy.deepcopy(GOOD)
    twice["models"].append(copy.deepcopy(GOOD["models"][0]))
    with pytest.raises(ConfigError, match="defined twice"):
        parse_config(twice)
    with pytest.raises(ConfigError, match="vault reference was not resolved"):
        parse_config(_with([*DEPLOYMENT, "api_key"], "{vault://env/x}"))
    with pytest.raises(ConfigError, match=r"models\[0\]\.deployments\[0\]\.model"):
        parse_config(_with([*DEPLOYMENT, "model"], "gpt-4o"))


def test_parse_config_checks_alias_references() -> None:
    """Fallbacks and complexity routes must name other aliases of the route; Kong's schema cannot say so."""
    base = copy.deepcopy(GOOD)
    base["models"][0]["fallbacks"] = ["nowhere"]
    with pytest.raises(ConfigError, match="'nowhere' is not another alias"):
        parse_config(base)
    routing = copy.deepcopy(GOOD)
    routing["models"].append({"name": "auto", "route_by_complexity": {"strong": "chat", "weak": "auto"}})
    with pytest.raises(ConfigError, match="'auto' is not an alias with deployments"):
        parse_config(routing)
    access = dict(copy.deepcopy(GOOD), model_access=[{"consumers": ["bob"], "models": ["gpt-5"]}])
    with pytest.raises(ConfigError, match="'gpt-5' is not an alias"):
        parse_config(access)


def test_routing_defaults_and_access() -> None:
    parsed = parse_config(dict(copy.deepcopy(GOOD), model_access=[{"consumers": ["bob"], "models": ["chat"]}]))
    alias = parsed.models["chat"]
    assert alias.strategy == "weighted" and alias.deployments[0].id == "chat#0"
    assert parsed.routing.retries == 2 and parsed.routing.cooldown.allowed_fails == 3
    assert parsed.allowed("chat", "bob", None) and parsed.allowed("other", "alice", None)
    assert not parsed.allowed("other", "bob", "bob-id")


def test_parse_config_reads_keys_from_the_environment_once() -> None:
    parsed = parse_config(GOOD, env={"OPENAI_KEY": "from-env"})
    deployment = parsed.models["chat"].deployments[0]
    assert deployment.api_key == "from-env"
    assert "from-env" not in repr(deployment)  # a secret never reaches a log line through repr


def test_config_key_ignores_kongs_markers() -> None:
    marked = dict(GOOD, __seq__=3, __plugin_id="abc", __key__="k")
    assert parse_config(marked).key == parse_config(GOOD).key


def test_shipped_kong_yml_is_valid() -> None:
    """kong.yml: key-auth and rate-limiting in front of our plugin, whose config Kong would accept, on the
    Service, so that every endpoint's route shares them; each route's methods are its endpoints' own."""
    doc = yaml.safe_load((ROOT / "kong.yml").read_text())
    assert doc["_format_version"] == "3.0"
    service = doc["services"][0]
    assert not [r for r in service["routes"] if r.get("plugins")], "a route's own plugins would override the chain"
    assert {r["name"]: (r["methods"], r["paths"]) for r in service["routes"]} == {
        "llm-api": (["POST"], ["/v1/chat/completions", "/v1/embeddings", "/v1/messages", "/v1/responses",
                               "/v1/completions"]),
        "llm-models": (["GET"], ["/v1/models"])}
    plugins = service["plugins"]
    names = [p["name"] for p in plugins]
    assert {"key-auth", "rate-limiting", "llm-gateway"} <= set(names)
    ours = next(p for p in plugins if p["name"] == "llm-gateway")
    filled, errors = validate_plugin_config(kong_schema(), ours["config"])
    assert errors is None, errors
    parsed = parse_config(filled)
    assert any(d.is_demo for a in parsed.models.values() for d in a.deployments)
    assert doc["consumers"], "demo consumers are part of the example"


def _run_check(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_gateway", "check", *map(str, files)], capture_output=True,
                          text=True, cwd=ROOT)


def test_the_image_builds_step_checks_the_shipped_kong_yml() -> None:
    """Dockerfile.kong checks kong.yml with our command (``kong config parse`` crashes on Kong 3.9 with an
    external plugin server): the same command passes on the shipped file."""
    dockerfile = (ROOT / "Dockerfile.kong").read_text()
    assert "RUN /opt/llm-gateway/bin/kong-llm-gateway check /kong/kong.yml" in dockerfile
    assert "kong config parse" not in dockerfile.replace("`kong config parse`", "")
    result = _run_check(ROOT / "kong.yml")
    assert result.returncode == 0, result.stderr
    assert "1 llm-gateway plugin config(s) valid" in result.stdout


def _shipped() -> dict:
    return yaml.safe_load((ROOT / "kong.yml").read_text())


def _ours(doc: dict) -> dict:
    return next(p for p in doc["services"][0]["plugins"] if p["name"] == "llm-gateway")["config"]


BAD_FILES = {
    "literal api key": (lambda c: c["models"][0]["deployments"][0].update(api_key="literal"),
                        "config.models[0].deployments[0].api_key: should start with: {vault://"),
    "unknown field": (lambda c: c.update(temperature=0.2), "config.temperature: unknown field"),
    "no deployments": (lambda c: c["models"][0].update(deployments=[]), "config.models[0].deployments"),
    "fallback to nowhere": (lambda c: c["models"][1].update(fallbacks=["nowhere"]), "'nowhere' is not another alias"),
    "unknown provider": (lambda c: c["models"][0]["deployments"][0].update(model="nope/x"),
                         "config.models[0].deployments[0].model: model 'nope/x': unknown provider 'nope'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_check_refuses_a_bad_kong_yml_naming_the_field(case: str, tmp_path: Path) -> None:
    mutate, expected = BAD_FILES[case]
    doc = _shipped()
    mutate(_ours(doc))
    path = tmp_path / "kong.yml"
    path.write_text(yaml.safe_dump(doc))
    result = _run_check(path)
    assert result.returncode == 1
    assert f"{path}: services[0].plugins[" in result.stderr and expected in result.stderr, result.stderr


def test_check_finds_the_plugin_wherever_deck_allows_it(tmp_path: Path) -> None:
    from llm_gateway.kong.declarative_check import check_file

    bad = {"models": [{"name": "x", "deployments": [{"model": "demo/x", "api_key": "literal"}]}]}
    doc = {"_format_version": "3.0", "plugins": [{"name": "llm-gateway", "config": bad}],
           "routes": [{"name": "r", "paths": ["/r"], "plugins": [{"name": "llm-gateway", "config": bad}]}],
           "consumers": [{"username": "c", "plugins": [{"name": "llm-gateway", "config": bad}]}]}
    path = tmp_path / "kong.yml"
    path.write_text(yaml.safe_dump(doc))
    count, problems = check_file(path, models=False)
    assert count == 3
    assert [p.split(": ")[1] for p in problems] == ["plugins[0] (llm-gateway)", "routes[0].plugins[0] (llm-gateway)",
                                                   "consumers[0].plugins[0] (llm-gateway)"]
