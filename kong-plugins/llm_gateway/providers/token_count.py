"""The input tokens of a Messages prompt on one deployment, for ``/v1/messages/count_tokens``: the provider's own
count where LiteLLM can ask for it (Anthropic's free count_tokens endpoint), LiteLLM's token counter otherwise.

LiteLLM's counter reads Anthropic's content blocks as they are (text, images, documents, tool_use,
tool_result, thinking), with tools in OpenAI's shape (LiteLLM's adapter translates them). It runs in a worker
thread, so a large prompt is counted exactly without holding the event loop; images count LiteLLM's default
per image and are never fetched.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import litellm
from litellm.types.utils import LlmProviders
from litellm.utils import ProviderConfigManager

from llm_gateway.accounting.tokens import _custom_tokenizer, rough_tokens
from llm_gateway.config import Deployment
from llm_gateway.providers.upstream import lean

log = logging.getLogger("llm_gateway.providers.token_count")


def _provider_counter(deployment: Deployment) -> Any:
    """LiteLLM's token counter that asks the deployment's provider, if it has one."""
    if lean(deployment) is not None:
        return None  # OpenAI's format has no count endpoint
    provider, _, model = deployment.model.partition("/")
    try:
        info = ProviderConfigManager.get_provider_model_info(model=model, provider=LlmProviders(provider))
    except ValueError:
        return None
    counter = info.get_token_counter() if info is not None else None
    if counter is None or not counter.should_use_token_counting_api(custom_llm_provider=provider):
        return None
    return counter


async def _ask_provider(deployment: Deployment, params: dict[str, Any]) -> int | None:
    """The provider's own count, or None when it cannot give one (the caller then counts locally)."""
    counter = _provider_counter(deployment)
    if counter is None:
        return None
    model = deployment.model.partition("/")[2]
    litellm_params = {"api_base": deployment.api_base, "api_key": deployment.api_key}
    try:
        async with asyncio.timeout(deployment.timeout):
            counted = await counter.count_tokens(
                model_to_use=model, messages=params["messages"], contents=None,
                deployment={"litellm_params": litellm_params}, request_model=model, tools=params.get("tools"),
                system=params.get("system"))
    except Exception as exc:  # a timeout, a transport failure: the local count still answers
        log.info("the provider's count_tokens failed (%s); counting locally", type(exc).__name__)
        return None
    if counted is None or counted.error or not isinstance(counted.total_tokens, int):
        status = getattr(counted, "status_code", None)
        log.info("the provider's count_tokens did not answer (status %s); counting locally", status)
        return None
    return counted.total_tokens


def count_locally(model: str, params: dict[str, Any]) -> int:
    """LiteLLM's token counter over the system prompt, the messages and the tools, for ``model``."""
    from litellm.llms.anthropic.pass_through.adapters.transformation import LiteLLMAnthropicMessagesAdapter

    messages: list[Any] = list(params["messages"])
    system = params.get("system")
    if system:
        messages.insert(0, {"role": "system", "content": system})
    tools = None
    if params.get("tools"):
        tools, _ = LiteLLMAnthropicMessagesAdapter().translate_anthropic_tools_to_openai(params["tools"], model=model)
    return int(litellm.token_counter(model=model, custom_tokenizer=_custom_tokenizer(model), messages=messages,
                                     tools=tools or None, use_default_image_token_count=True))


async def count_tokens(deployment: Deployment, params: dict[str, Any]) -> tuple[int, str]:
    """(input tokens, how they were counted: "provider", "litellm" or "estimate") of the prompt in ``params``."""
    counted = await _ask_provider(deployment, params)
    if counted is not None:
        return counted, "provider"
    model = deployment.model.partition("/")[2] or deployment.model
    try:
        return await asyncio.to_thread(count_locally, model, params), "litellm"
    except Exception as exc:  # a block LiteLLM's counter does not know: a rough count beats a failure
        log.info("LiteLLM's token counter failed (%s); estimating from the prompt's length", type(exc).__name__)
        return rough_tokens(len(json.dumps([params.get("system"), params["messages"], params.get("tools")],
                                           default=str))), "estimate"
