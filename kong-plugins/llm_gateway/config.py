"""Typed, validated plugin settings built from the JSON config Kong sends with ``plugin.StartInstance``.

Kong has already validated the config against ``schema.py``, but an absent optional record arrives as null
with no defaults filled, and Kong's schema language cannot say everything (unique alias names), so defaults
and checks live here too. Keys are resolved once, here, never per request.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_gateway.budgets import WINDOWS, Budget

DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_BODY_BYTES = 1_048_576
DEMO_PREFIX = "demo/"
DEFAULT_RESERVATION_TOKENS = 1024
PRICE_FIELDS = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost")


class ConfigError(ValueError):
    """The plugin config cannot be used; the message names the field, never a secret."""


@dataclass(frozen=True)
class Deployment:
    """One place an alias can be served from."""

    model: str  # LiteLLM model string as configured, e.g. "openai/gpt-4o-mini" or "demo/echo"
    api_base: str | None
    api_key: str | None = field(repr=False)  # resolved secret: never logged, never in a response
    timeout: float
    price: Mapping[str, float] | None = None  # per-token USD overriding LiteLLM's price map

    @property
    def is_demo(self) -> bool:
        return self.model.startswith(DEMO_PREFIX)


@dataclass(frozen=True)
class Alias:
    """A model name clients use, mapped to the deployments that can serve it."""

    name: str
    deployments: tuple[Deployment, ...]


@dataclass(frozen=True)
class RedisSettings:
    """Where shared state lives when several Kong nodes must agree."""

    url: str = field(repr=False)  # may carry a password
    key_prefix: str = "llmgw:"
    usage_stream: str = "llmgw:usage"
    timeout: float = 0.5


@dataclass(frozen=True)
class GatewayConfig:
    """Everything one plugin instance (one route's plugin config) decides."""

    key: str  # stable digest of the config: plugin instances with equal configs share one GatewayConfig
    models: Mapping[str, Alias]
    max_body_bytes: int
    budgets: tuple[Budget, ...] = ()
    budget_reservation_tokens: int = DEFAULT_RESERVATION_TOKENS
    budget_fail_open: bool = False
    redis: RedisSettings | None = None
    route_id: str | None = None  # Kong adds the scope of the plugin to its config: the route, the service
    service_id: str | None = None


def config_key(raw: Mapping[str, Any]) -> str:
    """Digest of the user-visible config (Kong's ``__seq__``/``__plugin_id``/``__key__`` markers left out)."""
    visible = {k: v for k, v in raw.items() if not k.startswith("__")}
    canonical = json.dumps(visible, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _number(value: Any, where: str, default: float, *, positive: bool = True) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number")
    if positive and value <= 0:
        raise ConfigError(f"{where}: must be greater than 0")
    return float(value)


def _optional_str(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string")
    return value


def _deployment(raw: Any, where: str, env: Mapping[str, str]) -> Deployment:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a record")
    model = _optional_str(raw.get("model"), f"{where}.model")
    if model is None or "/" not in model:
        raise ConfigError(f"{where}.model: expected a LiteLLM model string such as openai/gpt-4o-mini")
    key_env = _optional_str(raw.get("api_key_env"), f"{where}.api_key_env")
    api_key = _optional_str(raw.get("api_key"), f"{where}.api_key")  # Kong resolved any vault reference
    if api_key is not None and api_key.startswith("{vault://"):
        raise ConfigError(f"{where}.api_key: the vault reference was not resolved by Kong")
    if api_key is None and key_env is not None:
        api_key = env.get(key_env) or None
    price_raw = raw.get("price")
    price = None
    if price_raw is not None:
        if not isinstance(price_raw, Mapping):
            raise ConfigError(f"{where}.price: expected a record")
        price = {k: _number(price_raw[k], f"{where}.price.{k}", 0.0, positive=False)
                 for k in PRICE_FIELDS if price_raw.get(k) is not None}
    return Deployment(
        model=model,
        api_base=_optional_str(raw.get("api_base"), f"{where}.api_base"),
        api_key=api_key,
        timeout=_number(raw.get("timeout"), f"{where}.timeout", DEFAULT_TIMEOUT),
        price=price or None,
    )


def _budgets(raw: Any) -> tuple[Budget, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("budgets: expected an array")
    budgets, names = [], set()
    for i, item in enumerate(raw):
        where = f"budgets[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: expected a record")
        name = _optional_str(item.get("name"), f"{where}.name")
        if name is None or name in names:
            raise ConfigError(f"{where}.name: required, and unique among budgets")
        names.add(name)
        if item.get("window") not in WINDOWS:
            raise ConfigError(f"{where}.window: expected one of {', '.join(WINDOWS)}")
        tokens, usd = item.get("tokens"), item.get("usd")
        if tokens is None and usd is None:
            raise ConfigError(f"{where}: set tokens, usd, or both")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
            raise ConfigError(f"{where}.tokens: expected a positive integer")
        consumers = item.get("consumers")
        if consumers is not None and not (isinstance(consumers, list) and all(isinstance(c, str) for c in consumers)):
            raise ConfigError(f"{where}.consumers: expected a list of consumer usernames")
        budgets.append(Budget(name=name, window=item["window"], tokens=tokens,
                              usd=_number(usd, f"{where}.usd", 0.0) if usd is not None else None,
                              consumers=frozenset(consumers) if consumers else None))
    return tuple(budgets)


def _redis(raw: Any) -> RedisSettings | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("redis: expected a record")
    url = _optional_str(raw.get("url"), "redis.url")
    if url is None or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis.url: expected a redis://, rediss:// or unix:// URL")
    return RedisSettings(url=url, key_prefix=_optional_str(raw.get("key_prefix"), "redis.key_prefix") or "llmgw:",
                         usage_stream=_optional_str(raw.get("usage_stream"), "redis.usage_stream") or "llmgw:usage",
                         timeout=_number(raw.get("timeout"), "redis.timeout", 0.5))


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Build settings from Kong's config JSON; raises ConfigError with the offending field's path."""
    env = os.environ if env is None else env
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("models: at least one model alias is required")
    models: dict[str, Alias] = {}
    for i, alias_raw in enumerate(models_raw):
        where = f"models[{i}]"
        if not isinstance(alias_raw, Mapping):
            raise ConfigError(f"{where}: expected a record")
        name = _optional_str(alias_raw.get("name"), f"{where}.name")
        if name is None:
            raise ConfigError(f"{where}.name: required field missing")
        if name in models:
            raise ConfigError(f"{where}.name: alias '{name}' is defined twice")
        deployments_raw = alias_raw.get("deployments")
        if not isinstance(deployments_raw, list) or not deployments_raw:
            raise ConfigError(f"{where}.deployments: at least one deployment is required")
        models[name] = Alias(name, tuple(
            _deployment(d, f"{where}.deployments[{j}]", env) for j, d in enumerate(deployments_raw)
        ))
    max_body = raw.get("max_body_bytes")
    if max_body is None:
        max_body = DEFAULT_MAX_BODY_BYTES
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1:
        raise ConfigError("max_body_bytes: expected a positive integer")
    reservation = raw.get("budget_reservation_tokens")
    if reservation is None:
        reservation = DEFAULT_RESERVATION_TOKENS
    if isinstance(reservation, bool) or not isinstance(reservation, int) or reservation < 1:
        raise ConfigError("budget_reservation_tokens: expected a positive integer")
    return GatewayConfig(key=config_key(raw), models=models, max_body_bytes=max_body,
                         budgets=_budgets(raw.get("budgets")),
                         budget_reservation_tokens=reservation, budget_fail_open=raw.get("budget_fail_open") is True,
                         redis=_redis(raw.get("redis")),
                         route_id=raw.get("route_id") if isinstance(raw.get("route_id"), str) else None,
                         service_id=raw.get("service_id") if isinstance(raw.get("service_id"), str) else None)


class ConfigRegistry:
    """Configs by key, shared by the RPC side (instances) and the listener (requests).

    Kong starts one instance per nginx worker for the same config and replaces instances on every config
    rebuild; a ticket minted by an instance that has just been closed must still find its config, so a config
    outlives its last instance by ``grace_seconds``.
    """

    def __init__(self, grace_seconds: float = 300.0) -> None:
        self._configs: dict[str, GatewayConfig] = {}
        self._refs: dict[str, int] = {}
        self._released_at: dict[str, float] = {}
        self._grace = grace_seconds

    def acquire(self, config: GatewayConfig) -> GatewayConfig:
        current = self._configs.setdefault(config.key, config)
        self._refs[config.key] = self._refs.get(config.key, 0) + 1
        self._released_at.pop(config.key, None)
        return current

    def release(self, key: str) -> None:
        refs = self._refs.get(key, 0) - 1
        if refs > 0:
            self._refs[key] = refs
            return
        self._refs.pop(key, None)
        self._released_at[key] = time.monotonic()

    def get(self, key: str) -> GatewayConfig | None:
        return self._configs.get(key)

    def sweep(self) -> None:
        """Forget configs released longer than the grace period ago."""
        deadline = time.monotonic() - self._grace
        for key, at in list(self._released_at.items()):
            if at < deadline:
                del self._released_at[key]
                self._configs.pop(key, None)

    def __len__(self) -> int:
        return len(self._configs)
