"""What tokens cost: LiteLLM's local price map, with per-deployment overrides.

``prices_for`` looks a model up once per (model, override) and caches it; ``cost_usd`` is arithmetic and
follows LiteLLM's own (``litellm.cost_per_token``) for the common case: uncached prompt tokens at the input
price, cache reads at the cache-read price, cache writes at the cache-write price (Anthropic), completion
tokens (reasoning tokens included) at the output price. Not modelled: tiered prices above 128k/200k prompt
tokens, batch and priority tiers, Anthropic's 1-hour cache writes, audio/image token prices, per-request tool
fees.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price map at import

import litellm

from llm_gateway.accounting.tokens import TokenUsage

PRICE_KEYS = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
              "cache_creation_input_token_cost")

# --------------------------------------------------------------------------------------------------------------
# Prices and cost
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Prices:
    """USD per token. A missing cache price means cache tokens cost the input price."""

    input_per_token: float
    output_per_token: float
    cache_read_per_token: float | None
    cache_creation_per_token: float | None = None


def _price(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def _map_entry(model: str) -> Mapping[str, Any] | None:
    """LiteLLM's price-map entry for a model string, with or without its provider prefix (the prefixless entry
    only if it belongs to that provider, as LiteLLM itself checks)."""
    cost_map = litellm.model_cost
    entry = cost_map.get(model)
    if entry is None and "/" in model:
        provider, _, bare = model.partition("/")
        entry = cost_map.get(bare)
        if entry is not None and not _provider_matches(entry, provider):
            entry = None
    return entry if isinstance(entry, Mapping) else None


def _provider_matches(entry: Mapping[str, Any], provider: str) -> bool:
    try:
        from litellm.utils import _check_provider_match

        return bool(_check_provider_match(dict(entry), provider))
    except Exception:  # a LiteLLM without that helper: the plain rule
        listed = entry.get("litellm_provider")
        return listed is None or listed == provider or str(listed).startswith(provider)


@lru_cache(maxsize=4096)
def _prices(model: str, override: tuple[tuple[str, float], ...]) -> Prices | None:
    entry = _map_entry(model) or {}
    chosen = {key: _price(entry.get(key)) for key in PRICE_KEYS}
    chosen.update(override)
    if chosen["input_cost_per_token"] is None or chosen["output_cost_per_token"] is None:
        return None
    return Prices(input_per_token=chosen["input_cost_per_token"], output_per_token=chosen["output_cost_per_token"],
                  cache_read_per_token=chosen["cache_read_input_token_cost"],
                  cache_creation_per_token=chosen["cache_creation_input_token_cost"])


def prices_for(model: str, override: Mapping | None = None) -> Prices | None:
    """Per-token prices of a LiteLLM model string (``openai/gpt-4o-mini``, ``anthropic/claude-haiku-4-5``),
    from LiteLLM's local price map, each field overridden by ``override`` (``input_cost_per_token``,
    ``output_cost_per_token``, ``cache_read_input_token_cost``, ``cache_creation_input_token_cost``). None when
    the input or output price is unknown. Cached per (model, override): call ``clear_price_cache`` after
    changing ``litellm.model_cost`` at run time."""
    key: tuple[tuple[str, float], ...] = ()
    if override:
        key = tuple(sorted((k, p) for k in PRICE_KEYS if (p := _price(override.get(k))) is not None))
    return _prices(model, key)


def clear_price_cache() -> None:
    _prices.cache_clear()


def cost_usd(usage: TokenUsage | None, prices: Prices | None) -> float | None:
    """USD for ``usage`` at ``prices``: uncached prompt tokens at the input price, cache reads at the cache-read
    price, cache writes at the cache-write price (each the input price when unknown), completion tokens —
    reasoning included — at the output price. None when either is unknown."""
    if usage is None or prices is None:
        return None
    cached = min(usage.cached, usage.prompt)
    creation = min(usage.cache_creation, usage.prompt - cached)
    uncached = usage.prompt - cached - creation
    read_price = prices.input_per_token if prices.cache_read_per_token is None else prices.cache_read_per_token
    write_price = (prices.input_per_token if prices.cache_creation_per_token is None
                   else prices.cache_creation_per_token)
    return (uncached * prices.input_per_token + cached * read_price + creation * write_price
            + usage.completion * prices.output_per_token)
