"""Provider calls through LiteLLM, in-process and async: OpenAI format in, OpenAI format out.

LiteLLM knows the providers (request and response translation, auth headers, error mapping); this module
only turns a configured deployment into LiteLLM arguments and LiteLLM's objects back into OpenAI JSON.
Retries belong to the gateway's router, so LiteLLM's own are switched off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
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


def _call_args(deployment: Deployment, params: dict[str, Any]) -> dict[str, Any]:
    if deployment.is_demo:
        model = "openai/" + deployment.model[len(DEMO_PREFIX):]
        api_base, api_key = _demo_base, DEMO_API_KEY
    else:
        model, api_base, api_key = deployment.model, deployment.api_base, deployment.api_key
    # Retries are the gateway's decision, not the SDK's (the OpenAI SDK would otherwise retry twice).
    # chat_request only admits function tools, so LiteLLM's MCP bridge never applies: skipping it also
    # spares importing the optional `mcp` package on every call that has tools.
    args = dict(params, model=model, timeout=deployment.timeout, max_retries=0, num_retries=0,
                _skip_mcp_handler=True)
    if api_base:
        args["api_base"] = api_base
    if api_key:
        args["api_key"] = api_key
    return args


async def complete(deployment: Deployment, params: dict[str, Any]) -> dict[str, Any]:
    """One non-streaming completion, as an OpenAI ``chat.completion`` object."""
    response = await litellm.acompletion(**_call_args(deployment, params), stream=False)
    result = response.model_dump(exclude_none=True)
    for choice in result.get("choices", ()):
        choice.pop("provider_specific_fields", None)
        if isinstance(choice.get("message"), dict):
            choice["message"].pop("provider_specific_fields", None)
    return result


def _openai_chunk(chunk: Any) -> dict[str, Any]:
    """LiteLLM's chunk as OpenAI sends it: the usage chunk has ``choices: []``, not an empty delta."""
    data = chunk.model_dump(exclude_none=True)
    choices = data.get("choices") or []
    for choice in choices:
        choice.pop("provider_specific_fields", None)
    if "usage" in data and all(not c.get("delta") and not c.get("finish_reason") for c in choices):
        data["choices"] = []
    return data


async def open_stream(deployment: Deployment, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """A stream of OpenAI ``chat.completion.chunk`` objects; usage is always requested upstream.

    The first chunk is fetched before this returns, so a provider that fails before sending anything fails
    here, while the gateway can still answer with a proper status code.
    """
    args = _call_args(deployment, params)
    args["stream_options"] = {"include_usage": True}
    stream = await litellm.acompletion(**args, stream=True)
    iterator = stream.__aiter__()
    first = await iterator.__anext__()

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield _openai_chunk(first)
        async for chunk in iterator:
            yield _openai_chunk(chunk)

    return chunks()
