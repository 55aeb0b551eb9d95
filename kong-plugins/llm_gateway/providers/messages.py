"""Anthropic Messages requests served by any deployment: natively where the provider speaks Anthropic's Messages
API, translated by LiteLLM's Anthropic adapter everywhere else.

* Native (``anthropic/...``, and whatever else LiteLLM has an Anthropic Messages config for: Bedrock invoke,
  Vertex Claude, Azure AI): ``litellm.anthropic.messages.acreate``, whose pass-through forwards Anthropic's
  wire as is (``anthropic_native``).
* Translated (OpenAI-format deployments, the demo provider, every other provider): LiteLLM's adapter turns the
  request into a chat completion (``AnthropicAdapter.translate_completion_input_params_with_tool_mapping``),
  which goes through the gateway's own chat path (``providers.chat``: the lean OpenAI path, the parameter
  policy, drop_params), and turns the answer back into Anthropic's (``translate_completion_output_params``,
  and ``AnthropicStreamWrapper`` for streams). OpenAI's ``prompt_tokens_details.cached_tokens`` comes out as
  ``cache_read_input_tokens``.

Either way the usage the client sees (the JSON ``usage``, the final ``message_delta``'s) holds all four of
Anthropic's counts, and the ``Usage`` the ledger reads holds what the provider reported.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any

from litellm.types.utils import LlmProviders, ModelResponse, ModelResponseStream
from litellm.utils import ProviderConfigManager

from llm_gateway.config import Deployment
from llm_gateway.errors import GatewayError, ProviderOverloaded, from_build_exception
from llm_gateway.providers import anthropic_native, chat
from llm_gateway.providers.anthropic_native import complete_usage
from llm_gateway.providers.openai_compatible import Usage

# Anthropic's service tiers as OpenAI names them
SERVICE_TIERS = {"auto": "auto", "standard_only": "default"}
# what the chat parameters the adapter produced are called in the client's request, for error messages
CLIENT_NAMES = {"reasoning_effort": "thinking", "stop": "stop_sequences", "user": "metadata.user_id",
                "max_completion_tokens": "max_tokens", "response_format": "output_format"}
_CHAT_NAME = re.compile(r"(?<![\w.])(" + "|".join(CLIENT_NAMES) + r")(?!\w)")


@lru_cache(maxsize=1024)
def is_native(model: str) -> bool:
    """Whether LiteLLM calls this model string's provider on Anthropic's own Messages API."""
    provider, _, name = model.partition("/")
    try:
        config = ProviderConfigManager.get_provider_anthropic_messages_config(model=name,
                                                                              provider=LlmProviders(provider))
    except ValueError:  # not a LiteLLM provider (demo/...)
        return False
    return config is not None


def _sse(event: dict[str, Any]) -> bytes:
    return (f"event: {event.get('type', 'message')}\ndata: ".encode()
            + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")


def _chat_params(deployment: Deployment, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The Messages request as chat-completion parameters (LiteLLM's adapter), and the adapter's map of tool
    names it shortened back to the client's. ``thinking: disabled`` is what a chat model does anyway, so it is
    not sent (LiteLLM would send ``reasoning_effort: none``, which most models refuse)."""
    from litellm.llms.anthropic.pass_through.adapters.transformation import AnthropicAdapter

    request = dict(params, model=deployment.model)
    if (request.get("thinking") or {}).get("type") == "disabled":
        del request["thinking"]
    provider = deployment.model.partition("/")[0]
    try:
        translated, names = AnthropicAdapter().translate_completion_input_params_with_tool_mapping(
            request, custom_llm_provider=None if deployment.is_demo else provider)
    except Exception as exc:  # nothing was sent: the request cannot be expressed as a chat completion
        raise from_build_exception(exc, params) from exc
    if translated is None:
        raise from_build_exception(ValueError("untranslatable"), params)
    chat_params = {k: v for k, v in dict(translated).items() if k != "model" and v is not None}
    if "service_tier" in chat_params:
        chat_params["service_tier"] = SERVICE_TIERS.get(chat_params["service_tier"], chat_params["service_tier"])
    return chat_params, names


def as_anthropic(err: GatewayError) -> GatewayError:
    """A provider failure as Anthropic's clients expect it: an overloaded provider is Anthropic's 529
    ``overloaded_error`` (still retried by the router: same code), and a 400 about chat parameters the adapter
    produced names them as the client's request does."""
    if isinstance(err, ProviderOverloaded):
        return GatewayError(529, "The provider is overloaded; retry shortly.", type="overloaded_error",
                            code=err.code)
    if err.status != 400 or err.code != "unsupported_parameter":
        return err
    message = _CHAT_NAME.sub(lambda m: CLIENT_NAMES[m.group(1)], err.message)
    param = CLIENT_NAMES.get(err.param, err.param) if err.param else None
    return GatewayError(err.status, message, type=err.type, code=err.code, param=param, headers=err.headers)


def _anthropic_json(result: dict[str, Any]) -> bytes:
    """LiteLLM's translated answer as Anthropic sends it: every usage count present, no gateway-internal field."""
    result["usage"] = complete_usage(result.get("usage"))
    result.pop("provider_specific_fields", None)
    return json.dumps(result, separators=(",", ":")).encode()


async def complete(deployment: Deployment, params: dict[str, Any], usage: Usage) -> bytes:
    """One Anthropic ``message`` JSON answer from ``deployment``."""
    try:
        if is_native(deployment.model):
            return await anthropic_native.complete(deployment, params, usage)
        return await _translated(deployment, params, usage)
    except GatewayError as err:
        raise as_anthropic(err) from err


async def _translated(deployment: Deployment, params: dict[str, Any], usage: Usage) -> bytes:
    from litellm.llms.anthropic.pass_through.adapters.transformation import AnthropicAdapter

    chat_params, names = _chat_params(deployment, params)
    raw = await chat.complete(deployment, chat_params, usage)
    try:
        response = ModelResponse(**json.loads(raw))
        translated = AnthropicAdapter().translate_completion_output_params(response, tool_name_mapping=names)
    except Exception as exc:
        raise _untranslatable() from exc
    if translated is None:
        raise _untranslatable()
    return _anthropic_json(dict(translated))


def _untranslatable() -> GatewayError:
    return GatewayError(502, "The provider's answer could not be translated.", type="server_error",
                        code="provider_error")


async def _chunks(events: AsyncIterator[bytes]) -> AsyncIterator[ModelResponseStream]:
    """The chat path's SSE events as the LiteLLM chunks its Anthropic stream wrapper reads."""
    async for event in events:
        for line in event.split(b"\n"):
            if line.startswith(b"data:") and (payload := line[5:].strip()) != b"[DONE]":
                try:
                    chunk = ModelResponseStream(**json.loads(payload))
                except Exception as exc:
                    raise _untranslatable() from exc
                yield chunk


async def open_stream(deployment: Deployment, params: dict[str, Any], usage: Usage) -> AsyncIterator[bytes]:
    """Anthropic SSE events from ``deployment``, message_start to message_stop. The provider's first chunk is
    read before this returns (a provider failing before it can still be retried)."""
    try:
        if is_native(deployment.model):
            events = await anthropic_native.open_stream(deployment, params, usage)
        else:
            events = await _translated_stream(deployment, params, usage)
    except GatewayError as err:
        raise as_anthropic(err) from err

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        except GatewayError as err:
            raise as_anthropic(err) from err
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return relay()


async def _translated_stream(deployment: Deployment, params: dict[str, Any], usage: Usage) -> AsyncIterator[bytes]:
    from litellm.llms.anthropic.pass_through.adapters.streaming_iterator import AnthropicStreamWrapper

    chat_params, names = _chat_params(deployment, params)
    upstream = await chat.open_stream(deployment, chat_params, True, usage)
    model = deployment.model.partition("/")[2]
    wrapper = AnthropicStreamWrapper(completion_stream=_chunks(upstream), model=model, tool_name_mapping=names)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event in wrapper:
                if not isinstance(event, dict):
                    continue
                if event.get("type") == "message_delta":
                    event["usage"] = complete_usage(event.get("usage"))
                    if usage.decorate:
                        usage.decorate(event["usage"])
                yield _sse(event)
        except GatewayError:
            raise
        except Exception as exc:
            raise _untranslatable() from exc
        finally:
            await upstream.aclose()  # type: ignore[attr-defined]

    return events()
