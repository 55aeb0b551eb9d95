"""``kong-llm-gateway check kong.yml``: every llm-gateway plugin entry of a declarative (decK) file, checked as
Kong would check it against our schema and then as the plugin server would parse it, without a Kong.

Why our own: on Kong 3.9 ``kong config parse`` crashes whenever an external plugin server is configured
(``plugin_servers/init.lua``: ``attempt to index upvalue 'kong'``, the bug of Kong/kong#7583), so an image
build cannot use it; ``kong start`` does check the whole file, but only when Kong starts. This check names
the bad field (``services[0].plugins[3] (llm-gateway): config.models[0].deployments[0].api_key:
should start with: {vault://``) and exits non-zero, so ``docker build`` fails on a bad kong.yml. Vault
references stand for values Kong resolves at start; they are checked as placeholders.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_gateway import PLUGIN_NAME
from llm_gateway.kong.schema import kong_schema
from llm_gateway.kong.schema_validation import VAULT_REFERENCE, validate_plugin_config

# Where decK puts plugins: globally, and nested under services, routes (of a service, or top-level) and consumers.
_FIELD_FIRST = re.compile(r"^[\w\[\].-]+: ")
PLUGIN_PLACES: dict[str, dict] = {
    "plugins": {},
    "services": {"plugins": {}, "routes": {"plugins": {}}},
    "routes": {"plugins": {}},
    "consumers": {"plugins": {}},
}


def _plugins(node: Any, places: dict[str, dict], where: str = "") -> Iterator[tuple[str, Any]]:
    """(path, plugin entry) for every plugin of the document, at every level decK allows one."""
    for key, below in places.items():
        items = node.get(key) if isinstance(node, dict) else None
        for i, item in enumerate(items if isinstance(items, list) else ()):
            path = f"{where}{key}[{i}]"
            if key == "plugins":
                yield path, item
            else:
                yield from _plugins(item, below, path + ".")


def _messages(errors: Any, path: str) -> Iterator[str]:
    """Kong's nested error table as one line per field (arrays are 1-based there, 0-based in our paths)."""
    if isinstance(errors, dict):
        for key, value in errors.items():
            if key == "@entity":
                for message in value:
                    yield f"{path}: {message}"
            elif isinstance(key, int):
                yield from _messages(value, f"{path}[{key - 1}]")
            else:
                yield from _messages(value, f"{path}.{key}" if path else str(key))
    else:
        yield f"{path}: {errors}"


def _resolved(config: dict[str, Any]) -> dict[str, Any]:
    """The config as it reaches the plugin server once Kong has resolved its vault references."""
    config = copy.deepcopy(config)
    for alias in config.get("models") or ():
        for deployment in alias.get("deployments") or ():
            if isinstance(deployment.get("api_key"), str) and VAULT_REFERENCE.match(deployment["api_key"]):
                deployment["api_key"] = "resolved-by-kong"
    redis = config.get("redis")
    if isinstance(redis, dict) and isinstance(redis.get("url"), str) and VAULT_REFERENCE.match(redis["url"]):
        redis["url"] = "redis://resolved-by-kong:6379/0"
    return config


def check_plugin_config(config: Any, *, models: bool = True) -> list[str]:
    """Problems with one llm-gateway ``config`` (empty when Kong and the plugin server would both take it).
    ``models``: also ask LiteLLM whether each deployment's provider exists (imports LiteLLM, seconds)."""
    from llm_gateway.config import ConfigError, parse_config

    if not isinstance(config, dict):
        return ["config: expected a record"]
    filled, errors = validate_plugin_config(kong_schema(), config)
    if errors is not None:
        return list(_messages(errors, "config"))
    try:
        parse_config(_resolved(filled or {}), env={})
    except ConfigError as exc:
        message = str(exc)
        return [f"config.{message}" if _FIELD_FIRST.match(message) else f"config: {message}"]
    if not models:
        return []
    from llm_gateway.providers.upstream import check_model

    problems = []
    for i, alias in enumerate(filled["models"]):
        for j, deployment in enumerate(alias.get("deployments") or ()):
            try:
                check_model(deployment["model"])
            except ConfigError as exc:
                problems.append(f"config.models[{i}].deployments[{j}].model: {exc}")
    return problems


def check_file(path: str | Path, *, models: bool = True) -> tuple[int, list[str]]:
    """(number of llm-gateway entries checked, problems as printable lines) for a declarative file."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        return 0, [f"{path}: cannot be read as YAML: {exc}"]
    if not isinstance(doc, dict):
        return 0, [f"{path}: expected a mapping at the top level (decK format)"]
    problems, count = [], 0
    for where, plugin in _plugins(doc, PLUGIN_PLACES):
        if not isinstance(plugin, dict) or plugin.get("name") != PLUGIN_NAME:
            continue
        count += 1
        problems += [f"{path}: {where} ({PLUGIN_NAME}): {line}"
                     for line in check_plugin_config(plugin.get("config") or {}, models=models)]
    return count, problems
