"""Legacy text completions through ``litellm.atext_completion``: OpenAI's ``text_completion`` format in and out.

LiteLLM sends a deployment that speaks OpenAI's format (``openai/<model>`` for any model that is not one of
OpenAI's chat models, e.g. vLLM, gpt-3.5-turbo-instruct, the demo provider; ``text-completion-openai/``,
``azure_text/``, ``text-completion-codestral/``) to the provider's own ``/v1/completions``; any other provider
gets the prompt as one user message through LiteLLM's chat bridge. What the bridge cannot express is refused
here, per deployment, before anything is sent (400, never retried, never a cooldown): token-id prompts, several
prompts (the bridge would merge them into one message), and echo, logprobs, suffix, best_of (dropped instead,
and reported, when the alias sets ``drop_params``).

LiteLLM's objects are fixed up to OpenAI's schema: ``text`` is a string in every chunk (LiteLLM sends null in
the last), the usage chunk has ``choices: []``, and LiteLLM's own fields (``reasoning_content``,
``provider_specific_fields``) and nulls the schema does not allow are left out. Usage is always requested
upstream and reaches the client only if it asked; LiteLLM's and the SDK's retries are off (the gateway's).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import litellm

from llm_gateway.config import Deployment
from llm_gateway.errors import bad_request, from_provider_exception, unsupported_parameters
from llm_gateway.providers.openai_compatible import Usage
from llm_gateway.providers.upstream import OPENAI_PREFIX, call_args, lean

NATIVE_PROVIDERS = frozenset({"text-completion-openai", "azure_text", "text-completion-codestral"})
NOT_BRIDGEABLE = ("echo", "logprobs", "suffix", "best_of")  # text-completion parameters chat cannot express
LITELLM_FIELDS = ("reasoning_content", "provider_specific_fields")


def native(deployment: Deployment) -> bool:
    """Whether LiteLLM sends this deployment's text completions to the provider's own /v1/completions."""
    if deployment.is_demo:
        return True
    provider, _, model = deployment.model.partition("/")
    if provider in NATIVE_PROVIDERS:
        return True
    return provider == "openai" and model not in litellm.open_ai_chat_completion_models


def _args(deployment: Deployment, params: dict[str, Any], usage: Usage) -> dict[str, Any]:
    """The keyword arguments of ``litellm.atext_completion`` for this deployment, or a 400 for what its
    provider cannot be asked."""
    params = dict(params)
    if not native(deployment):
        prompt = params["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            params["prompt"] = prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad_request("'prompt': the model behind this alias takes one text prompt per request (its "
                              "provider has no text-completion API: token ids and several prompts need one)",
                              param="prompt")
        refused = [name for name in NOT_BRIDGEABLE if name in params]
        if refused and not deployment.drop_params:
            raise unsupported_parameters(refused)
        for name in refused:
            del params[name]
        usage.dropped = refused
    args = call_args(deployment, params)
    args.pop("_skip_mcp_handler", None)  # a chat-completion switch: text completions have no tools
    if deployment.is_demo and (fast := lean(deployment)):
        model, api_base, api_key = fast
        args.update(model=OPENAI_PREFIX + model, api_base=api_base, api_key=api_key)
    return args


def _no_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    return value


def _choice(choice: dict[str, Any]) -> dict[str, Any]:
    for name in LITELLM_FIELDS:
        choice.pop(name, None)
    if not isinstance(choice.get("text"), str):
        choice["text"] = ""
    choice.setdefault("logprobs", None)
    choice.setdefault("finish_reason", None)
    return choice


def _openai_json(data: dict[str, Any]) -> dict[str, Any]:
    for name in LITELLM_FIELDS:
        data.pop(name, None)
    data["object"] = "text_completion"
    data["choices"] = [_choice(c) for c in data.get("choices") or () if isinstance(c, dict)]
    if data.get("system_fingerprint") is None:
        data.pop("system_fingerprint", None)
    if isinstance(data.get("usage"), dict):
        data["usage"] = _no_nulls(data["usage"])
    else:
        data.pop("usage", None)
    return data


def _take(usage: Usage, choices: list[dict[str, Any]]) -> None:
    for choice in choices:
        if choice["text"]:
            usage.add_text(choice["text"])
        if isinstance(choice.get("finish_reason"), str):
            usage.finish_reasons.append(choice["finish_reason"])


async def complete(deployment: Deployment, params: dict[str, Any], usage: Usage) -> bytes:
    """One ``text_completion`` as OpenAI's JSON bytes; ``usage`` gets what the provider reported."""
    args = _args(deployment, params, usage)
    try:
        response = await litellm.atext_completion(**args, stream=False)
    except Exception as exc:
        raise from_provider_exception(exc, params) from exc
    data = _openai_json(response.model_dump())
    usage.model, usage.usage = data.get("model"), data.get("usage")
    if usage.usage:
        usage.finish_reasons.extend(c["finish_reason"] for c in data["choices"] if c.get("finish_reason"))
    else:
        _take(usage, data["choices"])
    return json.dumps(data, separators=(",", ":")).encode()


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


async def open_stream(deployment: Deployment, params: dict[str, Any], include_usage: bool,
                      usage: Usage) -> AsyncIterator[bytes]:
    """SSE events of ``text_completion`` chunks, ``[DONE]`` excluded. The first is read before this returns,
    so a provider failing before its first byte fails here, while a status code can still say so."""
    args = _args(deployment, params, usage)
    try:
        stream = await litellm.atext_completion(**args, stream=True, stream_options={"include_usage": True})
        iterator = stream.__aiter__()
        first = await iterator.__anext__()
    except StopAsyncIteration:
        raise from_provider_exception(RuntimeError("empty stream")) from None
    except Exception as exc:
        raise from_provider_exception(exc, params) from exc

    async def events() -> AsyncIterator[bytes]:
        chunk: Any = first
        while True:
            data = chunk.model_dump()
            reported = data.get("usage")
            data = _openai_json(data)
            if reported:  # LiteLLM's usage chunk carries a choice with no text and no finish reason: not OpenAI's
                data["choices"] = [c for c in data["choices"] if c["text"] or c["finish_reason"]]
            usage.model = usage.model or data.get("model")
            _take(usage, data["choices"])
            if reported:
                usage.usage = data["usage"]
                if include_usage and usage.decorate:
                    usage.decorate(data["usage"])
            if not include_usage:
                data.pop("usage", None)  # (OpenAI puts a null usage in the other chunks; its schema does not)
            if data["choices"] or "usage" in data:
                yield _sse(data)
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise from_provider_exception(exc) from exc

    return events()
