"""Embedding calls: OpenAI format in, OpenAI's CreateEmbeddingResponse out, whatever the provider.

OpenAI-format deployments (``openai/...``, ``demo/...``) take a lean path like chat's: the request goes up as
the client sent it (``encoding_format`` included, so a base64 answer is relayed without a float ever being
parsed), and the provider's bytes are relayed when they already are what OpenAI sends. Every other provider
goes through ``litellm.aembedding``, which knows its wire (Cohere's ``texts``/``input_type``/
``embedding_types`` and ``meta.billed_units``, Voyage, Bedrock, Vertex, ...); it is always asked for floats,
and base64 is encoded here exactly as OpenAI does (little-endian float32, base64), so every client gets the
same bytes whichever provider answered.

Parameters follow chat's policy (providers/parameter_policy.py): what LiteLLM says a provider cannot take
(``get_optional_params_embeddings``, LiteLLM's own decision) is refused with a 400 naming it, or dropped and
reported when the alias sets ``drop_params``; on an OpenAI-format deployment LiteLLM's rule is applied only to
the OpenAI models it knows (``dimensions`` on ``text-embedding-ada-002``), since a self-hosted server decides
for itself. Token-id inputs go only where LiteLLM can send them. All of this is decided before anything is
sent, so such a 400 is never retried and never cools a deployment.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from array import array
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import litellm
from litellm.types.utils import LlmProviders
from litellm.utils import ProviderConfigManager, get_optional_params_embeddings

from llm_gateway.config import Deployment
from llm_gateway.errors import (
    bad_request,
    from_build_exception,
    from_provider_exception,
    named_parameters,
    unsupported_parameters,
)
from llm_gateway.providers.openai_compatible import Usage, malformed, post_for_json
from llm_gateway.providers.upstream import lean

OPENAI_BASE = "https://api.openai.com/v1"
OPTIONAL = ("dimensions", "user")  # what a provider may be unable to take (encoding_format is the gateway's)
TOKEN_PROVIDERS = frozenset({"openai", "azure", *litellm.openai_compatible_providers})  # take token ids as-is
Estimate = Callable[[str], int]


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)  # NaN and Infinity are no JSON, and no embedding


# --------------------------------------------------------------------------------------------------------------
# Vectors: OpenAI's two encodings
# --------------------------------------------------------------------------------------------------------------

def to_base64(vector: list[float]) -> str:
    """What OpenAI sends for ``encoding_format: base64``: the values as float32, little-endian, base64."""
    values = array("f", vector)
    if sys.byteorder != "little":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode()


def from_base64(text: str) -> list[float]:
    """The floats of an OpenAI base64 embedding."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 4:
        raise ValueError("not float32 data")
    values = array("f")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()


def _encoded(value: Any, encoding: str) -> tuple[list[float] | str, bool]:
    """(the embedding in ``encoding``, whether it had to change); ValueError/TypeError when it is no vector."""
    if isinstance(value, str):
        if encoding == "base64":
            if len(base64.b64decode(value, validate=True)) % 4:  # a string that is no float32 base64 is no vector
                raise ValueError("not float32 data")
            return value, False
        return from_base64(value), True
    if not isinstance(value, list) or not value:
        raise ValueError("no vector")
    if encoding == "base64":
        return to_base64(value), True
    array("d", value)  # numbers only (checked in C)
    return value, False


def openai_answer(data: Any, count: int, encoding: str, model: str, usage: Usage,
                  estimate: Estimate) -> dict[str, Any] | None:
    """The provider's answer made OpenAI's, in place, or None when it already was (its bytes can be relayed).
    Raises the 502 for an answer that is no list of ``count`` embeddings. ``usage`` gets what was reported;
    when nothing was, the gateway's count, marked estimated (accounting/tokens.py), which the answer carries."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != count or not all(isinstance(i, dict) for i in items):
        raise malformed()
    changed = False
    try:
        for i, item in enumerate(items):
            item["embedding"], converted = _encoded(item.get("embedding"), encoding)
            changed |= converted
            if item.get("object") != "embedding" or not isinstance(item.get("index"), int):
                item.setdefault("index", i)
                item["object"] = "embedding"
                changed = True
    except (ValueError, TypeError, OverflowError, binascii.Error):
        raise malformed() from None
    if sorted(item["index"] for item in items) != list(range(count)):
        raise malformed()
    if data.get("object") != "list" or not isinstance(data.get("model"), str):
        data["object"] = "list"
        data.setdefault("model", model)
        if not isinstance(data["model"], str):
            data["model"] = model
        changed = True
    usage.model = data["model"]
    reported = data.get("usage")
    prompt = reported.get("prompt_tokens") if isinstance(reported, dict) else None
    if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0:
        if not isinstance(reported.get("total_tokens"), int):
            reported["total_tokens"] = prompt
            changed = True
        usage.usage = reported
    else:  # the gateway's count, in the answer (the schema requires it) and, marked estimated, for the ledger
        tokens = estimate(model)
        data["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        usage.usage = {**data["usage"], "estimated": True}
        changed = True
    return data if changed else None


def _dumps(data: dict[str, Any]) -> bytes:
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # an infinite or NaN value: no embedding
        raise malformed() from None


# --------------------------------------------------------------------------------------------------------------
# Parameters: what LiteLLM says each provider can take
# --------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _known_openai_embedding(model: str) -> bool:
    """Whether LiteLLM knows ``model`` as one of OpenAI's embedding models (its rules are for those only)."""
    entry = litellm.model_cost.get(model)
    return isinstance(entry, dict) and entry.get("mode") == "embedding" and entry.get("litellm_provider") == "openai"


def _litellm_optional(provider: str, model: str, sent: dict[str, Any]) -> dict[str, Any]:
    """The provider's own parameters for ``sent``, as LiteLLM maps them; UnsupportedParamsError when it cannot."""
    return get_optional_params_embeddings(model=model, custom_llm_provider=provider, **sent)


def parameters(provider: str, model: str, params: dict[str, Any], drop: bool,
               usage: Usage) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the OpenAI parameters the provider gets, LiteLLM's mapping of them) under the policy in the module
    docstring; the dropped names go in ``usage.dropped``. Never sends anything."""
    sent = {k: params[k] for k in OPTIONAL if k in params}
    if provider == "openai" and not _known_openai_embedding(model):
        return sent, sent
    where = f"the model behind this alias ({provider})"
    for _ in range(len(OPTIONAL) + 1):
        try:
            return sent, _litellm_optional(provider, model, sent)
        except litellm.UnsupportedParamsError as exc:
            names = [n for n in named_parameters(exc, sent) if n in sent] or list(sent)
            if not drop or not names:
                raise unsupported_parameters(names, where) from None
            usage.dropped.extend(names)
            sent = {k: v for k, v in sent.items() if k not in names}
        except Exception as exc:
            raise from_build_exception(exc, sent) from None
    raise unsupported_parameters(list(sent), where)


@lru_cache(maxsize=256)
def _embedding_config(provider: str, model: str) -> Any:
    try:
        return ProviderConfigManager.get_provider_embedding_config(model=model, provider=LlmProviders(provider))
    except Exception:  # a provider LiteLLM serves without a config class (its legacy handlers)
        return None


def _check_input(provider: str, model: str, inputs: Any, optional: dict[str, Any]) -> None:
    """Refuse (400) an input the provider's LiteLLM transformation cannot express, before anything is sent:
    LiteLLM would raise it from inside the call, where it looks like a provider failure (retried)."""
    config = _embedding_config(provider, model)
    tokens = isinstance(inputs, list) and not isinstance(inputs[0], str)
    if config is not None:
        try:
            config.transform_embedding_request(model, inputs if isinstance(inputs, list) else [inputs],
                                               dict(optional), {})
        except Exception:
            if tokens:
                raise bad_request(f"The provider behind this alias ({provider}) embeds text only: send 'input' "
                                  f"as strings, not token ids.", param="input") from None
            raise bad_request(f"The input cannot be sent to the provider behind this alias ({provider}).",
                              param="input") from None
    elif tokens and provider not in TOKEN_PROVIDERS:
        raise bad_request(f"The provider behind this alias ({provider}) embeds text only: send 'input' as strings, "
                          f"not token ids.", param="input")


def _asks_float(provider: str, model: str) -> bool:
    """Whether LiteLLM lets the provider be told to answer floats (Cohere's embedding_types: ["float"])."""
    config = _embedding_config(provider, model)
    try:
        return config is not None and "encoding_format" in config.get_supported_openai_params(model)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------------------
# The calls
# --------------------------------------------------------------------------------------------------------------

async def embed(deployment: Deployment, params: dict[str, Any], count: int, usage: Usage, *,
                estimate: Estimate) -> bytes:
    """One embeddings answer from ``deployment``, as OpenAI's CreateEmbeddingResponse JSON bytes, in the
    client's ``encoding_format``. Provider failures raise GatewayError, so the router can retry them."""
    encoding = params.get("encoding_format", "float")
    if fast := lean(deployment):
        model, api_base, api_key = fast
        sent, _ = parameters("openai", model, params, deployment.drop_params, usage)
        body = {"model": model, "input": params["input"], **sent}
        if "encoding_format" in params:
            body["encoding_format"] = encoding
        return await _lean(model, api_base, api_key, body, deployment.timeout, count, usage, estimate)
    provider, _, model = deployment.model.partition("/")
    sent, optional = parameters(provider, model, params, deployment.drop_params, usage)
    _check_input(provider, model, params["input"], optional)
    if _asks_float(provider, model):
        sent["encoding_format"] = "float"
    args: dict[str, Any] = dict(sent, model=deployment.model, input=params["input"], timeout=deployment.timeout,
                                max_retries=0, num_retries=0)
    if deployment.api_base:
        args["api_base"] = deployment.api_base
    if deployment.api_key:
        args["api_key"] = deployment.api_key
    try:
        response = await litellm.aembedding(**args)
    except Exception as exc:
        raise from_provider_exception(exc, sent) from exc
    reported = response.usage
    prompt = getattr(reported, "prompt_tokens", None)
    data = {"object": "list", "model": response.model or model,
            "data": [item if isinstance(item, dict) else item.model_dump() for item in response.data or ()],
            "usage": {"prompt_tokens": prompt, "total_tokens": getattr(reported, "total_tokens", None) or prompt}}
    return _dumps(openai_answer(data, count, encoding, model, usage, estimate) or data)


async def _lean(model: str, api_base: str | None, api_key: str | None, body: dict[str, Any], timeout_s: float,
                count: int, usage: Usage, estimate: Estimate) -> bytes:
    url = (api_base or OPENAI_BASE).rstrip("/") + "/embeddings"
    payload = json.dumps(body, separators=(",", ":")).encode()
    raw, data = await post_for_json(url, payload, api_key, timeout_s, parse_constant=_refuse_constant)
    changed = openai_answer(data, count, body.get("encoding_format", "float"), model, usage, estimate)
    return raw if changed is None else _dumps(changed)
