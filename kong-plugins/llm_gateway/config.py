"""Typed, validated plugin settings built from the JSON config Kong sends with ``plugin.StartInstance``.

Kong has already validated the config against ``kong/schema.py``, but an absent optional record arrives as null
with no defaults filled, and Kong's schema language cannot say everything (unique alias names), so defaults
and checks live here too. Keys are resolved once, here, never per request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_gateway.accounting.budgets import WINDOWS, Budget
from llm_gateway.routing.state import CooldownPolicy
from llm_gateway.routing.strategies import STRATEGIES

DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_BODY_BYTES = 1_048_576
DEMO_PREFIX = "demo/"
DEFAULT_RESERVATION_TOKENS = 1024
PRICE_FIELDS = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
                "cache_creation_input_token_cost")


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
    id: str = ""  # "<alias>#<n>" or the configured name: what X-LLM-Deployment and the records say
    weight: float = 1.0
    rpm: int | None = None  # requests per minute this deployment may take (across nodes with Redis)
    tpm: int | None = None  # tokens per minute
    health_key: str = ""  # the upstream (model, base, credential) as routing state knows it: see health_key()
    drop_params: bool = False  # its alias's drop_params: drop what it cannot honour (and say so), not 400

    @property
    def is_demo(self) -> bool:
        return self.model.startswith(DEMO_PREFIX)


@dataclass(frozen=True)
class ComplexityRoute:
    """A routing alias: hard requests go to ``strong``, the others to ``weak`` (both aliases of this route)."""

    strong: str
    weak: str
    threshold: float = 0.5


@dataclass(frozen=True)
class Alias:
    """A model name clients use, mapped to the deployments that can serve it (or, for a routing alias, to two
    other aliases by prompt complexity), with where to go when they all fail."""

    name: str
    deployments: tuple[Deployment, ...]
    strategy: str = "weighted"
    fallbacks: tuple[str, ...] = ()
    context_window_fallbacks: tuple[str, ...] = ()
    content_policy_fallbacks: tuple[str, ...] = ()
    complexity: ComplexityRoute | None = None
    drop_params: bool = False  # drop parameters a deployment cannot honour (X-LLM-Dropped-Params), not 400


@dataclass(frozen=True)
class RoutingSettings:
    """Retries, backoff, the per-request deadline and cooldowns, for every alias of the route."""

    retries: int = 2  # attempts after each deployment of the alias was tried once, before its fallbacks
    backoff_initial: float = 0.25  # seconds; doubles per retry, with full jitter, capped at backoff_max
    backoff_max: float = 4.0
    deadline: float = 120.0  # seconds for the whole request: every attempt, backoff and fallback
    latency_buffer: float = 0.1
    cooldown: CooldownPolicy = field(default_factory=CooldownPolicy)


@dataclass(frozen=True)
class ModelAccess:
    """These consumers (usernames or ids) may use only these aliases."""

    consumers: frozenset[str]
    models: frozenset[str]


@dataclass(frozen=True)
class RedisSettings:
    """Where shared state lives when several Kong nodes must agree."""

    url: str = field(repr=False)  # may carry a password
    key_prefix: str = "llmgw:"
    usage_stream: str = "llmgw:usage"
    timeout: float = 0.5


@dataclass(frozen=True)
class Limits:
    """What one request may take: how long a stream may last and stay silent, and how long the lease of its
    budget reservation outlives its deadline (what a crashed node's reservations cost the consumer)."""

    stream_max_duration: float = 600.0  # seconds from the request's arrival until the gateway ends the stream
    stream_idle_timeout: float = 120.0  # seconds without a data event from the provider (comments do not count)
    min_completion_tokens: int = 16  # fewer left in a token budget after the prompt: 429 rather than a stub
    lease_grace: float = 60.0  # a reservation's lease ends this long after its request must have ended

    def lease_seconds(self, routing: RoutingSettings, stream: bool) -> float:
        """How long a request's reservation may stay without settling: its whole possible life, plus grace."""
        life = max(routing.deadline, self.stream_max_duration) if stream else routing.deadline
        return life + self.lease_grace


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
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    model_access: tuple[ModelAccess, ...] = ()
    limits: Limits = field(default_factory=Limits)

    def allowed(self, alias: str, *identities: str | None) -> bool:
        """A consumer named in model_access may use only the aliases its entries list; others use all."""
        entries = [a for a in self.model_access if any(i in a.consumers for i in identities if i)]
        return not entries or any(alias in a.models for a in entries)


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


def health_key(model: str, api_base: str | None, api_key: str | None) -> str:
    """Cooldowns, in-flight and rpm/tpm counts belong to the upstream, not to a name in one alias: two aliases
    (or two routes) sending to the same model at the same base with the same credential share its health.
    A digest, so the credential never reaches Redis or a log."""
    material = f"{model}\n{api_base or ''}\n{api_key or ''}".encode()
    return hashlib.sha256(material).hexdigest()[:20]


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a positive integer")
    return value


def _names(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: expected a list of names")
    return tuple(value)


def _deployment(raw: Any, where: str, env: Mapping[str, str], default_id: str) -> Deployment:
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
        id=_optional_str(raw.get("name"), f"{where}.name") or default_id,
        health_key=health_key(model, raw.get("api_base"), api_key),
        weight=_number(raw.get("weight"), f"{where}.weight", 1.0),
        rpm=_count(raw.get("rpm"), f"{where}.rpm"),
        tpm=_count(raw.get("tpm"), f"{where}.tpm"),
    )


def _alias(raw: Any, where: str, env: Mapping[str, str]) -> Alias:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a record")
    name = _optional_str(raw.get("name"), f"{where}.name")
    if name is None:
        raise ConfigError(f"{where}.name: required field missing")
    deployments_raw = raw.get("deployments") or []
    complexity_raw = raw.get("route_by_complexity")
    if not isinstance(deployments_raw, list) or bool(deployments_raw) == (complexity_raw is not None):
        raise ConfigError(f"{where}: set either deployments (at least one) or route_by_complexity")
    drop_params = raw.get("drop_params")
    if drop_params is not None and not isinstance(drop_params, bool):
        raise ConfigError(f"{where}.drop_params: expected a boolean")
    deployments = tuple(dataclasses.replace(_deployment(d, f"{where}.deployments[{j}]", env, f"{name}#{j}"),
                                            drop_params=drop_params is True)
                        for j, d in enumerate(deployments_raw))
    if len({d.id for d in deployments}) != len(deployments):
        raise ConfigError(f"{where}.deployments: deployment names must be unique within the alias")
    complexity = None
    if complexity_raw is not None:
        if not isinstance(complexity_raw, Mapping):
            raise ConfigError(f"{where}.route_by_complexity: expected a record")
        strong = _optional_str(complexity_raw.get("strong"), f"{where}.route_by_complexity.strong")
        weak = _optional_str(complexity_raw.get("weak"), f"{where}.route_by_complexity.weak")
        if strong is None or weak is None:
            raise ConfigError(f"{where}.route_by_complexity: strong and weak aliases are required")
        threshold = _number(complexity_raw.get("threshold"), f"{where}.route_by_complexity.threshold", 0.5,
                            positive=False)
        if not 0 <= threshold <= 1:
            raise ConfigError(f"{where}.route_by_complexity.threshold: expected a number between 0 and 1")
        complexity = ComplexityRoute(strong=strong, weak=weak, threshold=threshold)
    strategy = raw.get("strategy") or "weighted"
    if strategy not in STRATEGIES:
        raise ConfigError(f"{where}.strategy: expected one of {', '.join(STRATEGIES)}")
    return Alias(name, deployments, strategy=strategy, fallbacks=_names(raw.get("fallbacks"), f"{where}.fallbacks"),
                 context_window_fallbacks=_names(raw.get("context_window_fallbacks"),
                                                 f"{where}.context_window_fallbacks"),
                 content_policy_fallbacks=_names(raw.get("content_policy_fallbacks"),
                                                 f"{where}.content_policy_fallbacks"),
                 complexity=complexity, drop_params=drop_params is True)


def _check_alias_references(models: Mapping[str, Alias]) -> None:
    """Fallbacks and complexity routes name aliases of the same route; a routing alias routes to aliases
    with deployments (no chains, so a request resolves in one step)."""
    for alias in models.values():
        for kind in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
            for target in getattr(alias, kind):
                if target not in models or target == alias.name:
                    raise ConfigError(f"models.{alias.name}.{kind}: '{target}' is not another alias of this route")
                if models[target].complexity is not None:
                    raise ConfigError(f"models.{alias.name}.{kind}: '{target}' is a routing alias")
        if alias.complexity is not None:
            for target in (alias.complexity.strong, alias.complexity.weak):
                if target not in models or models[target].complexity is not None:
                    raise ConfigError(f"models.{alias.name}.route_by_complexity: '{target}' is not an alias "
                                      f"with deployments on this route")


def _routing(raw: Any) -> RoutingSettings:
    if raw is None:
        return RoutingSettings()
    if not isinstance(raw, Mapping):
        raise ConfigError("routing: expected a record")
    retries = raw.get("retries")
    if retries is None:
        retries = 2
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        raise ConfigError("routing.retries: expected an integer between 0 and 10")
    cooldown_raw = raw.get("cooldown") or {}
    if not isinstance(cooldown_raw, Mapping):
        raise ConfigError("routing.cooldown: expected a record")
    defaults = CooldownPolicy()
    cooldown = CooldownPolicy(
        allowed_fails=_count(cooldown_raw.get("allowed_fails"), "routing.cooldown.allowed_fails")
        or defaults.allowed_fails,
        window_s=_number(cooldown_raw.get("window"), "routing.cooldown.window", defaults.window_s),
        cooldown_s=_number(cooldown_raw.get("duration"), "routing.cooldown.duration", defaults.cooldown_s),
        cool_on_429=cooldown_raw.get("on_rate_limit") is not False,
        cool_last_healthy=cooldown_raw.get("cool_last_healthy") is True,
    )
    return RoutingSettings(
        retries=retries,
        backoff_initial=_number(raw.get("backoff_initial"), "routing.backoff_initial", 0.25),
        backoff_max=_number(raw.get("backoff_max"), "routing.backoff_max", 4.0),
        deadline=_number(raw.get("deadline"), "routing.deadline", 120.0),
        latency_buffer=_number(raw.get("latency_buffer"), "routing.latency_buffer", 0.1, positive=False),
        cooldown=cooldown,
    )


def _limits(raw: Any) -> Limits:
    if raw is None:
        return Limits()
    if not isinstance(raw, Mapping):
        raise ConfigError("limits: expected a record")
    defaults = Limits()
    floor = raw.get("min_completion_tokens")
    return Limits(
        stream_max_duration=_number(raw.get("stream_max_duration"), "limits.stream_max_duration",
                                    defaults.stream_max_duration),
        stream_idle_timeout=_number(raw.get("stream_idle_timeout"), "limits.stream_idle_timeout",
                                    defaults.stream_idle_timeout),
        min_completion_tokens=_count(floor, "limits.min_completion_tokens") or defaults.min_completion_tokens,
        lease_grace=_number(raw.get("lease_grace"), "limits.lease_grace", defaults.lease_grace),
    )


def _model_access(raw: Any, models: Mapping[str, Alias]) -> tuple[ModelAccess, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("model_access: expected an array")
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ConfigError(f"model_access[{i}]: expected a record")
        consumers = _names(item.get("consumers"), f"model_access[{i}].consumers")
        allowed = _names(item.get("models"), f"model_access[{i}].models")
        if not consumers:
            raise ConfigError(f"model_access[{i}].consumers: name at least one consumer")
        for name in allowed:
            if name not in models:
                raise ConfigError(f"model_access[{i}].models: '{name}' is not an alias of this route")
        entries.append(ModelAccess(consumers=frozenset(consumers), models=frozenset(allowed)))
    return tuple(entries)


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
        alias = _alias(alias_raw, f"models[{i}]", env)
        if alias.name in models:
            raise ConfigError(f"models[{i}].name: alias '{alias.name}' is defined twice")
        models[alias.name] = alias
    _check_alias_references(models)
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
                         service_id=raw.get("service_id") if isinstance(raw.get("service_id"), str) else None,
                         routing=_routing(raw.get("routing")),
                         model_access=_model_access(raw.get("model_access"), models),
                         limits=_limits(raw.get("limits")))


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

    def configs(self) -> list[GatewayConfig]:
        """Every config still held (health checks read which shared stores the routes depend on)."""
        return list(self._configs.values())

    def sweep(self) -> None:
        """Forget configs released longer than the grace period ago."""
        deadline = time.monotonic() - self._grace
        for key, at in list(self._released_at.items()):
            if at < deadline:
                del self._released_at[key]
                self._configs.pop(key, None)

    def __len__(self) -> int:
        return len(self._configs)
