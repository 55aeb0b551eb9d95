"""What is known of a deployment's model, for the model list: LiteLLM's model information (context window,
output limit, capabilities) and the prices the gateway bills it at (LiteLLM's price map under the
deployment's ``price`` override, exactly as ``accounting.prices`` charges it).

Three-valued on purpose: a model LiteLLM does not know shows ``None`` (unknown), never a guess and never an
error, so an operator's private model still lists. Nothing here reads a credential: LiteLLM is asked about the
model string alone (no api_key, no api_base), so no provider is called with the gateway's keys to describe a
model. A few LiteLLM providers (Ollama, Hugging Face) look their models up over the network even so: callers
build this off the event loop (``asyncio.to_thread``) and once per config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_gateway.accounting.prices import PRICE_KEYS, prices_for
from llm_gateway.config import Deployment
from llm_gateway.providers.upstream import target_of

log = logging.getLogger("llm_gateway.model_info")

LOOKUPS = 0  # LiteLLM model-information lookups made by this process (the per-config cache is tested with it)


def _capability_checks() -> dict[str, Callable[[str], bool]]:
    from litellm import utils

    return {
        "vision": utils.supports_vision,
        "tools": utils.supports_function_calling,
        "structured_output": utils.supports_response_schema,
        "reasoning": utils.supports_reasoning,
        "prompt_caching": utils.supports_prompt_caching,
    }


CAPABILITIES = ("vision", "tools", "structured_output", "reasoning", "prompt_caching")
# the built-in demo provider is the gateway's own code: it echoes text, and honours none of these
DEMO_SUPPORTS = dict.fromkeys(CAPABILITIES, False)


@dataclass(frozen=True)
class ModelFacts:
    """One deployment as a model picker needs it; ``None`` wherever nothing is known."""

    provider: str
    model: str
    mode: str | None  # LiteLLM's mode: chat, completion, embedding, responses, ...
    context_window: int | None  # prompt tokens the model accepts (LiteLLM's max_input_tokens)
    max_output_tokens: int | None
    supports: dict[str, bool | None]
    prices: dict[str, float | None]  # USD per token the gateway bills (PRICE_KEYS)
    price_source: str | None  # "override" (the deployment's price), "litellm" (its price map), None (unknown)

    def wire(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model, "mode": self.mode,
                "context_window": self.context_window, "max_output_tokens": self.max_output_tokens,
                "supports": dict(self.supports), **self.prices, "price_source": self.price_source}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _litellm_info(model: str) -> dict[str, Any] | None:
    """LiteLLM's model information for a model string, or None when it does not know the model."""
    global LOOKUPS
    import litellm

    LOOKUPS += 1
    try:
        info = litellm.get_model_info(model)
    except Exception:  # ModelNotMappedError and friends: an unknown model, not a failure
        return None
    return dict(info) if info else None


def _prices(deployment: Deployment) -> tuple[dict[str, float | None], str | None]:
    billed = prices_for(deployment.model, deployment.price)
    if billed is None:
        return dict.fromkeys(PRICE_KEYS), None
    values = dict(zip(PRICE_KEYS, (billed.input_per_token, billed.output_per_token, billed.cache_read_per_token,
                                   billed.cache_creation_per_token), strict=True))
    return values, "override" if deployment.price else "litellm"


def facts_of(deployment: Deployment) -> ModelFacts:
    """What LiteLLM (and the gateway's price settings) know of this deployment's model."""
    target = target_of(deployment)
    prices, source = _prices(deployment)
    if deployment.is_demo:
        return ModelFacts(target.provider, target.model, "chat", None, None, dict(DEMO_SUPPORTS), prices, source)
    info = _litellm_info(deployment.model)
    if info is None:
        return ModelFacts(target.provider, target.model, None, None, None, dict.fromkeys(CAPABILITIES), prices,
                          source)
    supports: dict[str, bool | None] = {}
    for name, check in _capability_checks().items():
        try:
            supports[name] = bool(check(deployment.model))
        except Exception:  # LiteLLM's checks do not raise; if one ever does, the answer is unknown
            supports[name] = None
    mode = info.get("mode")
    return ModelFacts(target.provider, target.model, mode if isinstance(mode, str) else None,
                      _count(info.get("max_input_tokens")), _count(info.get("max_output_tokens")), supports,
                      prices, source)


def smallest(values: list[int | None]) -> int | None:
    """What every deployment of an alias guarantees: the smallest limit, unknown if any is unknown."""
    if not values or any(v is None for v in values):
        return None
    return min(v for v in values if v is not None)


def all_support(values: list[bool | None]) -> bool | None:
    """A capability of an alias: true if every deployment has it, false if any lacks it, else unknown."""
    if any(v is False for v in values):
        return False
    if values and all(v is True for v in values):
        return True
    return None
