"""What happens to each Chat Completions parameter on one deployment: forwarded, translated, dropped or refused.

The policy (docs/parameters.md), for every request field of OpenAI's ``CreateChatCompletionRequest``:

* OpenAI-format deployments (``openai/...``, ``demo/...``): forwarded as sent, since the upstream speaks
  OpenAI. LiteLLM's OpenAI config still maps what it knows about a model (o-series and GPT-5 restrictions,
  ``max_tokens`` to ``max_completion_tokens``, ...): a parameter LiteLLM knows for OpenAI models but not for
  this *catalog* model (``reasoning_effort`` on gpt-4o, ``temperature`` != 1 on o3-mini) cannot be honoured.
  A parameter LiteLLM does not list (``metadata``, ``user`` on a model it does not know: every self-hosted
  vLLM, TGI or Ollama server) goes up as sent, for the upstream to decide.
* Other providers (``litellm.acompletion``): a parameter LiteLLM can translate for the provider is
  translated; anything else cannot be honoured, and neither can what LiteLLM would accept but never send
  (``PARTS_NEVER_SENT``, ``MESSAGE_FIELDS_NEVER_SENT``: e.g. ``input_audio`` and ``refusal`` content parts,
  and a message's ``name``, which LiteLLM's Anthropic transformation skips).
  ``response_format: json_object`` becomes a JSON-object schema, so Anthropic answers JSON.
* What cannot be honoured is refused with a 400 naming it, or, when the alias sets ``drop_params``, dropped
  and listed in the ``X-LLM-Dropped-Params`` response header. Nothing is dropped silently.

Building the provider request happens here too, guarded: whatever LiteLLM raises while *building* (nothing
was sent) is the client's request that cannot be expressed (``errors.from_build_exception``), a 400 that is
never retried and never cools a deployment.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import litellm
from litellm.types.utils import LlmProviders
from litellm.utils import ProviderConfigManager

from llm_gateway.errors import (
    GatewayError,
    bad_request,
    from_build_exception,
    named_parameters,
    unsupported_parameters,
)

# content part types a provider's LiteLLM transformation accepts but never sends
PARTS_NEVER_SENT: Mapping[str, frozenset[str]] = {"anthropic": frozenset({"input_audio", "refusal"})}
# message fields it accepts but never sends (an assistant's audio reference, a participant's name)
MESSAGE_FIELDS_NEVER_SENT: Mapping[str, frozenset[str]] = {"anthropic": frozenset({"audio", "name"})}
# providers whose LiteLLM mapping needs a schema for JSON mode (json_object alone is skipped)
JSON_MODE_NEEDS_SCHEMA = frozenset({"anthropic"})
_OPENAI_SAMPLE_MODELS = ("gpt-4o", "gpt-4o-audio-preview", "o3-mini", "gpt-5", "an-unknown-model")


@dataclass
class Prepared:
    """The parameters for one deployment (messages included) and the names dropped on the way."""

    params: dict[str, Any]
    dropped: list[str]
    body: dict[str, Any] | None = None  # the provider request, where it was built here (OpenAI format)


def openai_config(model: str) -> Any:
    return _openai_config(model)[0]


@lru_cache(maxsize=1024)
def _openai_config(model: str) -> tuple[Any, frozenset[str], bool]:
    """LiteLLM's config for an OpenAI-format model, what it supports, and whether LiteLLM knows the model."""
    config = ProviderConfigManager.get_provider_chat_config(model, LlmProviders.OPENAI)
    from litellm.llms.openai.chat import gpt_transformation

    unknown_cls = getattr(gpt_transformation, "OpenAIUnknownModelConfig", None)
    known = (not isinstance(config, unknown_cls)) if unknown_cls is not None else (
        model in litellm.model_cost or type(config) is not gpt_transformation.OpenAIGPTConfig)
    return config, frozenset(config.get_supported_openai_params(model)), known


@lru_cache(maxsize=1)
def _openai_params_litellm_knows() -> frozenset[str]:
    """Every parameter LiteLLM's OpenAI configs list for some model: absent for a catalog model means the
    model cannot take it; never listed means LiteLLM has no opinion (forwarded)."""
    known: set[str] = set()
    for model in _OPENAI_SAMPLE_MODELS:
        known |= _openai_config(model)[1]
    return frozenset(known)


def _drop_or_refuse(names: list[str], drop: bool, dropped: list[str], where: str) -> None:
    if not names:
        return
    if not drop:
        raise unsupported_parameters(names, where)
    dropped.extend(n for n in names if n not in dropped)


def _mapped(config: Any, model: str, params: dict[str, Any], drop: bool, dropped: list[str],
            where: str) -> dict[str, Any]:
    """LiteLLM's mapping of ``params``, never with LiteLLM's own drop_params (it drops without saying which):
    a parameter it refuses is dropped by name here (or refused), and the mapping retried."""
    params = dict(params)
    for _ in range(len(params) + 1):
        try:
            return config.map_openai_params(dict(params), {}, model, drop_params=False)
        except litellm.UnsupportedParamsError as exc:
            names = [n for n in named_parameters(exc, params) if n in params]
            if not drop or not names:
                raise unsupported_parameters(names, where) from None
            for name in names:
                params.pop(name)
            _drop_or_refuse(names, drop, dropped, where)
        except GatewayError:
            raise
        except Exception as exc:
            raise from_build_exception(exc, params) from None
    raise unsupported_parameters(sorted(params), where)


def for_openai_format(model: str, params: dict[str, Any], drop: bool, *, stream: bool) -> Prepared:
    """The request body for an upstream that speaks OpenAI's format (the lean path)."""
    config, supported, known = _openai_config(model)
    sent = {k: v for k, v in params.items() if k not in ("messages", "stream_options")}
    stream_options = params.get("stream_options")
    dropped: list[str] = []
    forwarded = {k: v for k, v in sent.items() if k not in supported}
    if known:  # LiteLLM knows this model: what it lists for other OpenAI models but not this one, it cannot take
        _drop_or_refuse([k for k in forwarded if k in _openai_params_litellm_knows()], drop, dropped,
                        "the model behind this alias")
        forwarded = {k: v for k, v in forwarded.items() if k not in dropped}
    optional = _mapped(config, model, {k: v for k, v in sent.items() if k in supported}, drop, dropped,
                       "the model behind this alias")
    optional.update(forwarded)
    try:
        body = config.transform_request(model, params["messages"], optional, {}, {})
    except Exception as exc:
        raise from_build_exception(exc, sent) from None
    if stream:
        body["stream"] = True
        # always: the gateway accounts every stream; the client's other stream options go up as sent
        body["stream_options"] = {**(stream_options or {}), "include_usage": True}
    else:
        body.pop("stream", None)
        body.pop("stream_options", None)
    return Prepared(params=params, dropped=dropped, body=body)


def _messages_it_sends(provider: str, messages: list[Any], drop: bool, dropped: list[str]) -> list[Any]:
    """The messages with nothing the provider's transformation would skip: refused (400 naming the first such
    field or part), or with drop_params dropped and named ("messages[1].name") in ``dropped``."""
    parts_never, fields_never = PARTS_NEVER_SENT.get(provider, frozenset()), \
        MESSAGE_FIELDS_NEVER_SENT.get(provider, frozenset())
    if not parts_never and not fields_never:
        return messages
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            out.append(message)
            continue
        for name in sorted(fields_never & message.keys()):
            if message[name] is None:
                continue
            at = f"messages[{i}].{name}"
            if not drop:
                raise bad_request(f"'{at}' is not supported by the model behind this alias ({provider}). The "
                                  f"route's operator can set drop_params on the alias to drop it instead.",
                                  param=at, code="unsupported_parameter")
            dropped.append(at)
        message = {k: v for k, v in message.items() if k not in fields_never}
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in parts_never for p in content):
            kept = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") in parts_never):
                    kept.append(part)
                    continue
                at = f"messages[{i}].content[{j}]"
                if not drop:
                    raise bad_request(f"'{at}': {part['type']} content is not supported by the model behind this "
                                      f"alias ({provider}).", param=at, code="unsupported_content")
                dropped.append(at)
            message["content"] = kept
        out.append(message)
    return out


def _has_remote_image(messages: list[Any]) -> bool:
    """Image parts by URL, which LiteLLM downloads while transforming: not transformed twice."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            url = (part.get("image_url") or {}).get("url") if isinstance(part, dict) else None
            if isinstance(url, str) and not url.startswith("data:"):
                return True
    return False


@lru_cache(maxsize=256)
def _builder(provider: str, model: str) -> Any:
    """LiteLLM's config for the provider, if it builds a trivial request standalone (checked once); else None
    and the guarded build is skipped: a build step that fails for everyone must not look like a client error."""
    try:
        config = ProviderConfigManager.get_provider_chat_config(model, LlmProviders(provider))
        if config is None:
            return None
        optional = config.map_openai_params({"max_tokens": 1}, {}, model, drop_params=False)
        config.transform_request(model, [{"role": "user", "content": "hi"}], optional, {}, {})
    except Exception:
        return None
    return config


def _as_litellm_prepares(config: Any, messages: list[Any]) -> list[Any]:
    """The messages as ``litellm.completion`` hands them to the provider's transformation: checked and fixed,
    developer messages as system messages where the provider has no developer role."""
    from litellm.utils import validate_and_fix_openai_messages

    messages = validate_and_fix_openai_messages(messages=messages)
    translate = getattr(config, "translate_developer_role_to_system_role", None)
    return list(translate(messages=messages)) if translate is not None else messages


@lru_cache(maxsize=1024)
def _supported(provider: str, model: str) -> frozenset[str]:
    """The OpenAI parameters LiteLLM translates for this provider and model (0.2 ms to ask: asked once)."""
    return frozenset(litellm.get_supported_openai_params(model=model, custom_llm_provider=provider) or ())


def for_litellm(provider: str, model: str, params: dict[str, Any], drop: bool) -> Prepared:
    """The parameters for ``litellm.acompletion`` to a provider that does not speak OpenAI's format."""
    where = f"the model behind this alias ({provider})"
    dropped: list[str] = []
    params = {k: v for k, v in params.items() if k != "stream_options"}  # the provider's own stream options
    params["messages"] = _messages_it_sends(provider, params["messages"], drop, dropped)
    response_format = params.get("response_format")
    if provider in JSON_MODE_NEEDS_SCHEMA and isinstance(response_format, dict) \
            and response_format.get("type") == "json_object" and "response_schema" not in response_format:
        params["response_format"] = {"type": "json_object", "response_schema": {"type": "object"}}
    supported = _supported(provider, model)
    _drop_or_refuse([k for k in params if k != "messages" and k not in supported], drop, dropped, where)
    for name in dropped:
        params.pop(name, None)
    config = _builder(provider, model)
    if config is not None:
        sent = copy.deepcopy({k: v for k, v in params.items() if k != "messages"})  # the mapping may change them
        optional = _mapped(config, model, sent, drop, dropped, where)
        for name in dropped:
            params.pop(name, None)
        if not _has_remote_image(params["messages"]):
            try:  # on copies: LiteLLM's transformations may change what they are given
                config.transform_request(model, _as_litellm_prepares(config, copy.deepcopy(params["messages"])),
                                         optional, {}, {})
            except Exception as exc:
                raise from_build_exception(exc, sent) from None
    return Prepared(params=params, dropped=dropped)
