"""How a deployment is called upstream, whatever the endpoint: LiteLLM configured once for the process, model
strings checked when a config loads, the target the response headers name, the arguments every LiteLLM call
takes (the gateway's retries, never LiteLLM's), and whether the lean OpenAI-compatible path applies.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price map at import

import litellm

from llm_gateway.config import DEMO_PREFIX, ConfigError, Deployment

litellm.telemetry = False
for _name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):  # one INFO line per call otherwise
    logging.getLogger(_name).setLevel(logging.WARNING)
litellm.suppress_debug_info = True
litellm.turn_off_message_logging = True
litellm.drop_params = False  # an unsupported parameter is the client's to know about (400), not to lose

DEMO_API_KEY = "demo-provider-needs-no-key"
OPENAI_PREFIX = "openai/"
_demo_base = "http://127.0.0.1:8788/v1"


def set_demo_base(url: str) -> None:
    """Where the built-in demo provider listens (set once by the server at start)."""
    global _demo_base
    _demo_base = url


def check_model(model: str) -> None:
    """Refuse at instance start a model string LiteLLM cannot route."""
    provider = model.split("/", 1)[0]
    if model.startswith(DEMO_PREFIX):
        return
    if provider not in litellm.provider_list:
        raise ConfigError(f"model '{model}': unknown provider '{provider}'")


@dataclass(frozen=True)
class Target:
    """What the response headers say about where a request went."""

    provider: str
    model: str


def target_of(deployment: Deployment) -> Target:
    provider, _, model = deployment.model.partition("/")
    return Target(provider=provider, model=model)


def call_args(deployment: Deployment, params: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a LiteLLM call to this deployment, ``params`` included."""
    # Retries are the gateway's decision, not the SDK's (the OpenAI SDK would otherwise retry twice).
    # chat_request only admits function tools, so LiteLLM's MCP bridge never applies: skipping it also
    # spares importing the optional `mcp` package on every call that has tools.
    args = dict(params, model=deployment.model, timeout=deployment.timeout, max_retries=0, num_retries=0,
                _skip_mcp_handler=True)
    if deployment.api_base:
        args["api_base"] = deployment.api_base
    if deployment.api_key:
        args["api_key"] = deployment.api_key
    return args


def lean(deployment: Deployment) -> tuple[str, str | None, str | None] | None:
    """(provider model, api_base, api_key) when the deployment speaks OpenAI's format natively."""
    if deployment.is_demo:
        return deployment.model[len(DEMO_PREFIX):], _demo_base, DEMO_API_KEY
    if deployment.model.startswith(OPENAI_PREFIX):
        return deployment.model[len(OPENAI_PREFIX):], deployment.api_base, deployment.api_key
    return None
