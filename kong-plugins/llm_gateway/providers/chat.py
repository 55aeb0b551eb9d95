"""Provider calls through LiteLLM, in-process and async: OpenAI format in, OpenAI format out.

LiteLLM knows the providers (request and response translation, auth headers, error mapping). Providers that
speak OpenAI's format take the lean path of ``openai_compatible`` (LiteLLM's OpenAI config, our own HTTP);
the others go through ``litellm.acompletion``. Either way ``parameter_policy`` decides first what each
parameter becomes on the deployment, and the listener gets OpenAI bytes that validate against OpenAI's
published schema (LiteLLM's objects are dumped without their nulls, so the nullable fields the schema
requires are put back), and a ``Usage`` filled with what the provider reported. Retries belong to the
gateway, so LiteLLM's are off.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import litellm

from llm_gateway.config import Deployment
from llm_gateway.errors import from_provider_exception
from llm_gateway.providers import openai_compatible, parameter_policy
from llm_gateway.providers.openai_compatible import Usage
from llm_gateway.providers.upstream import call_args, lean


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _prepared(deployment: Deployment, params: dict[str, Any], usage: Usage) -> dict[str, Any]:
    """The parameters for litellm.acompletion under the parameter policy; what was dropped goes in ``usage``."""
    provider, _, model = deployment.model.partition("/")
    prepared = parameter_policy.for_litellm(provider, model, params, deployment.drop_params)
    usage.dropped = prepared.dropped
    return prepared.params


def _openai_json(result: dict[str, Any]) -> dict[str, Any]:
    """LiteLLM's response as OpenAI's schema has it: nullable fields it requires are present (null)."""
    for choice in result.get("choices", ()):
        choice.pop("provider_specific_fields", None)
        choice.setdefault("finish_reason", None)
        choice.setdefault("logprobs", None)
        message = choice.get("message")
        if isinstance(message, dict):
            message.pop("provider_specific_fields", None)
            message.setdefault("content", None)
            message.setdefault("refusal", None)
            message.setdefault("role", "assistant")
    return result


async def complete(deployment: Deployment, params: dict[str, Any], usage: Usage) -> bytes:
    """One non-streaming completion, as OpenAI ``chat.completion`` JSON bytes."""
    if fast := lean(deployment):
        return await openai_compatible.complete(*fast, params, deployment.timeout, usage,
                                                drop=deployment.drop_params)
    params = _prepared(deployment, params, usage)
    try:
        response = await litellm.acompletion(**call_args(deployment, params), stream=False)
    except Exception as exc:
        raise from_provider_exception(exc, params) from exc
    result = _openai_json(response.model_dump(exclude_none=True))
    usage.model, usage.usage = result.get("model"), result.get("usage")
    if not usage.usage:
        usage.take_text(result.get("choices"))
    else:
        usage.take_finish_reasons(result.get("choices"))
    return json.dumps(result, separators=(",", ":")).encode()


def _openai_chunk(chunk: Any) -> dict[str, Any]:
    """LiteLLM's chunk as OpenAI sends it: the usage chunk has ``choices: []``, not an empty delta."""
    data = chunk.model_dump(exclude_none=True)
    choices = data.get("choices") or []
    for choice in choices:
        choice.pop("provider_specific_fields", None)
        choice.setdefault("finish_reason", None)  # required (nullable) in every chunk, not only the last
        choice.setdefault("delta", {})
        if isinstance(choice["delta"], dict):
            choice["delta"].pop("provider_specific_fields", None)
    if "usage" in data and all(not c.get("delta") and not c.get("finish_reason") for c in choices):
        data["choices"] = []
    return data


async def open_stream(deployment: Deployment, params: dict[str, Any], include_usage: bool,
                      usage: Usage) -> AsyncIterator[bytes]:
    """SSE events of OpenAI ``chat.completion.chunk`` objects, ``[DONE]`` excluded; usage is always
    requested upstream and reaches the client only if it asked.

    The first event is produced before this returns, so a provider that fails before sending anything fails
    here, while the gateway can still answer with a proper status code.
    """
    if fast := lean(deployment):
        return await openai_compatible.open_stream(*fast, params, deployment.timeout, include_usage, usage,
                                                   drop=deployment.drop_params)
    params = _prepared(deployment, params, usage)
    args = call_args(deployment, params)
    args["stream_options"] = {"include_usage": True}
    try:
        stream = await litellm.acompletion(**args, stream=True)
        iterator = stream.__aiter__()
        first = await iterator.__anext__()
    except Exception as exc:
        raise from_provider_exception(exc, params) from exc

    async def events() -> AsyncIterator[bytes]:
        chunk: Any = first
        while True:
            data = _openai_chunk(chunk)
            usage.model = usage.model or data.get("model")
            usage.take_text(data.get("choices"))
            if "usage" in data:
                usage.usage = data["usage"]
                if not include_usage:
                    data.pop("usage")
                elif usage.decorate:
                    usage.decorate(data["usage"])
            if data.get("choices") or "usage" in data:
                yield _sse(data)
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise from_provider_exception(exc) from exc

    return events()
