"""``GET /v1/models`` and ``GET /v1/models/{id}``: the route's aliases in OpenAI's list format, each with what is
known of the deployments behind it under the ``llm_gateway`` extension field.

A consumer sees only the aliases ``model_access`` lets it use: another alias is a 404 exactly like a missing
one, and the names of aliases it may not use never appear, not even as a fallback or a routing target. What is
known of each alias (LiteLLM's model information, the billed prices) is computed once per config, off the
event loop, and the bodies are serialised once per set of visible aliases: a request costs a dictionary
lookup (a config without ``model_access``) or one ``may_use`` per alias plus that lookup.

Each entry is OpenAI's ``Model`` object (``id``, ``object: "model"``, ``created``, ``owned_by``) plus::

    "llm_gateway": {
      "context_window": 128000,        # the smallest over its deployments; null if any is unknown
      "max_output_tokens": 16384,      # likewise
      "supports": {"vision": true, "tools": true, "structured_output": true, "reasoning": false,
                   "prompt_caching": true},   # true: every deployment has it; false: one lacks it; null: unknown
      "strategy": "weighted",          # how its deployments share requests (null for a routing alias)
      "routing": null,                 # or {"type": "complexity", "strong", "weak", "threshold"}
      "fallbacks": [], "context_window_fallbacks": [], "content_policy_fallbacks": [],
      "drop_params": false,            # parameters a deployment cannot honour are dropped (header), not a 400
      "deployments": [{"provider", "model", "mode", "context_window", "max_output_tokens", "supports",
                       "input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
                       "cache_creation_input_token_cost", "price_source", ("route": "strong" | "weak")}]
    }

``created`` is 0: an alias is a name in a route's config, not a model with a release date, and any clock
reading (the config's load time) differs between nodes and restarts, so clients caching the list would see it
change behind one load balancer. 0 is deterministic and sorts every alias alike (clients keep config order).
``owned_by`` names the providers behind the alias, in config order, joined by ``,``.
Never in it: api_key, api_base, deployment names (they default to ``<alias>#<n>``), weights, rpm/tpm.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_gateway.api.base import OPENAI_ERRORS, Admitted, ErrorFormat
from llm_gateway.config import Alias, GatewayConfig
from llm_gateway.errors import GatewayError
from llm_gateway.providers.model_info import CAPABILITIES, ModelFacts, all_support, facts_of, smallest

log = logging.getLogger("llm_gateway.models")

BUILDS = 0  # catalogs built by this process: once per config (the cache's tests read it)
MAX_VIEWS = 256  # distinct sets of visible aliases kept per config (model_access entries combine into few)
ECHO_LIMIT = 256


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _echo(value: str) -> str:
    return value if len(value) <= ECHO_LIMIT else value[:ECHO_LIMIT] + f"… ({len(value)} characters)"


def not_found(model_id: str) -> GatewayError:
    """The same 404 for an alias that does not exist and one this consumer may not use."""
    return GatewayError(404, f"The model '{_echo(model_id)}' does not exist on this route.", param="model",
                        code="model_not_found")


@dataclass(frozen=True)
class _Entry:
    """An alias as listed, its references to other aliases still unfiltered."""

    name: str
    model: dict[str, Any]  # the Model object; model["llm_gateway"] holds the references below
    references: tuple[str, ...]  # aliases it names (fallbacks, routing targets)


def _summary(facts: list[ModelFacts]) -> dict[str, Any]:
    return {"context_window": smallest([f.context_window for f in facts]),
            "max_output_tokens": smallest([f.max_output_tokens for f in facts]),
            "supports": {c: all_support([f.supports[c] for f in facts]) for c in CAPABILITIES}}


def _entry(alias: Alias, config: GatewayConfig, facts: Callable[[Any], ModelFacts]) -> _Entry:
    if alias.complexity is not None:
        route = alias.complexity
        tiers = [("strong", config.models[route.strong]), ("weak", config.models[route.weak])]
        deployments = [(tier, d) for tier, target in tiers for d in target.deployments]
        routing: dict[str, Any] | None = {"type": "complexity", "strong": route.strong, "weak": route.weak,
                                          "threshold": route.threshold}
        references: tuple[str, ...] = (route.strong, route.weak)
    else:
        deployments = [(None, d) for d in alias.deployments]
        routing = None
        references = ()
    known = [facts(d) for _, d in deployments]
    wired = []
    for (tier, _), f in zip(deployments, known, strict=True):
        item = f.wire()
        if tier is not None:
            item["route"] = tier
        wired.append(item)
    providers = list(dict.fromkeys(f.provider for f in known))
    extension = {**_summary(known), "strategy": None if routing else alias.strategy, "routing": routing,
                 "fallbacks": list(alias.fallbacks), "context_window_fallbacks": list(alias.context_window_fallbacks),
                 "content_policy_fallbacks": list(alias.content_policy_fallbacks),
                 "drop_params": alias.drop_params, "deployments": wired}
    references += alias.fallbacks + alias.context_window_fallbacks + alias.content_policy_fallbacks
    model = {"id": alias.name, "object": "model", "created": 0, "owned_by": ",".join(providers),
             "llm_gateway": extension}
    return _Entry(alias.name, model, references)


def _filtered(entry: _Entry, visible: frozenset[str]) -> dict[str, Any]:
    """The entry as a consumer that sees only ``visible`` gets it: other aliases' names left out."""
    if all(r in visible for r in entry.references):
        return entry.model
    extension = dict(entry.model["llm_gateway"])
    for kind in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
        extension[kind] = [name for name in extension[kind] if name in visible]
    if extension["routing"] is not None:
        extension["routing"] = {k: (None if k in ("strong", "weak") and v not in visible else v)
                                for k, v in extension["routing"].items()}
    return {**entry.model, "llm_gateway": extension}


@dataclass
class _View:
    """The serialised answers for one set of visible aliases."""

    listing: bytes
    models: dict[str, bytes]


@dataclass
class Catalog:
    """Every alias of one config as the model list shows it, and the bodies already serialised."""

    entries: dict[str, _Entry]
    full: _View
    views: dict[tuple[str, ...], _View] = field(default_factory=dict)

    @classmethod
    def build(cls, config: GatewayConfig) -> Catalog:
        """Computed once per config: every deployment's facts once, even when aliases share a deployment."""
        global BUILDS
        BUILDS += 1
        cache: dict[tuple[str, Any], ModelFacts] = {}

        def facts(deployment: Any) -> ModelFacts:
            key = (deployment.model, tuple(sorted((deployment.price or {}).items())))
            if key not in cache:
                cache[key] = facts_of(deployment)
            return cache[key]

        entries = {name: _entry(alias, config, facts) for name, alias in config.models.items()}
        catalog = cls(entries=entries, full=_View(b"", {}))
        catalog.full = catalog._view(frozenset(entries))
        return catalog

    def _view(self, visible: frozenset[str]) -> _View:
        models = {name: _filtered(entry, visible) for name, entry in self.entries.items() if name in visible}
        return _View(listing=_json({"object": "list", "data": list(models.values())}),
                     models={name: _json(model) for name, model in models.items()})

    def view_for(self, request: Admitted) -> _View:
        """The answers this consumer may see: every alias unless ``model_access`` names it."""
        if not request.config.model_access:
            return self.full
        visible = tuple(name for name in self.entries if request.may_use(name))
        if len(visible) == len(self.entries):
            return self.full
        view = self.views.get(visible)
        if view is None:
            if len(self.views) >= MAX_VIEWS:
                self.views.clear()
            view = self.views[visible] = self._view(frozenset(visible))
        return view


# one catalog per live config, by its key; an entry goes when its config is collected (the registry sweeps
# configs released long ago), so configs replaced over a long life do not pile up here
_catalogs: dict[str, tuple[weakref.ref[GatewayConfig], asyncio.Future[Catalog]]] = {}


def _forget(key: str, ref: weakref.ref[GatewayConfig]) -> None:
    held = _catalogs.get(key)
    if held is not None and held[0] is ref:
        del _catalogs[key]


def _timed_build(config: GatewayConfig) -> Catalog:
    started = time.perf_counter()
    catalog = Catalog.build(config)
    log.info("model list of config %s: %d aliases described in %.1f ms", config.key, len(catalog.entries),
             (time.perf_counter() - started) * 1000)
    return catalog


async def catalog_of(config: GatewayConfig) -> Catalog:
    """The config's catalog, built on first use in a worker thread (LiteLLM's lookups are synchronous and a
    few providers' go over the network). Concurrent first requests share one build, which a client leaving
    does not cancel; a build that failed is tried again by the next request."""
    held = _catalogs.get(config.key)
    if held is None or held[0]() is not config:
        ref = weakref.ref(config, lambda r, key=config.key: _forget(key, r))
        build = asyncio.ensure_future(asyncio.to_thread(_timed_build, config))

        def forget_failed(done: asyncio.Future[Catalog]) -> None:
            if done.cancelled() or done.exception() is not None:
                _forget(config.key, ref)

        build.add_done_callback(forget_failed)
        held = _catalogs[config.key] = (ref, build)
    build = held[1]
    if build.done():  # every request but the first few: no await, no shield
        return build.result()
    return await asyncio.shield(build)


class ListModels:
    """``GET /v1/models``: OpenAI's ``ListModelsResponse`` of the aliases this consumer may use."""

    name = "models.list"
    method = "GET"
    path = "/v1/models"
    errors: ErrorFormat = OPENAI_ERRORS

    async def answer(self, request: Admitted) -> bytes:
        return (await catalog_of(request.config)).view_for(request).listing


class RetrieveModel:
    """``GET /v1/models/{id}``: OpenAI's ``Model`` of one alias; 404 unless this consumer may use it."""

    name = "models.retrieve"
    method = "GET"
    path = "/v1/models/{model_id:.+}"  # aliases may hold slashes ("openai/gpt-4o"); SDKs send them as %2F
    errors: ErrorFormat = OPENAI_ERRORS

    async def answer(self, request: Admitted) -> bytes:
        model_id = request.match.get("model_id", "")
        if model_id not in request.config.models or not request.may_use(model_id):
            raise not_found(model_id)
        body = (await catalog_of(request.config)).view_for(request).models.get(model_id)
        if body is None:
            raise not_found(model_id)
        return body


ENDPOINT = ListModels()
RETRIEVE_ENDPOINT = RetrieveModel()  # the module's second endpoint: the registry lists both
