"""Token usage of one request: what the provider reported (OpenAI's and Anthropic's shapes, raw or as LiteLLM
normalises them), or an estimate when it reported nothing, and for budget reservations.

``from_provider_usage`` is a few dictionary lookups. ``estimate_*`` count tokens with ``litellm.token_counter``
(tiktoken, or the model's own tokenizer where LiteLLM has one), bounded so that any input costs time linear in
its size.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price map at import

import litellm

log = logging.getLogger("llm_gateway.accounting")



# --------------------------------------------------------------------------------------------------------------
# Usage
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one request. ``cached`` (cache reads) and ``cache_creation`` (cache writes, Anthropic) are
    part of ``prompt``; ``reasoning`` is part of ``completion``, as providers bill them."""

    prompt: int
    completion: int
    total: int
    cached: int
    reasoning: int
    estimated: bool
    cache_creation: int = 0


def _count(value: Any) -> int | None:
    """A token count from a usage field: a non-negative int, or None when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return max(0, int(value))


def _detail(usage: Mapping, details_key: str, key: str) -> int | None:
    details = usage.get(details_key)
    return _count(details.get(key)) if isinstance(details, Mapping) else None


def _first(*values: int | None) -> int | None:
    for value in values:
        if value is not None:
            return value
    return None


def from_provider_usage(usage: Mapping | None) -> TokenUsage | None:
    """The provider's report as TokenUsage; None when there is none (or it names no token count at all).

    Accepted shapes:

    * OpenAI: ``prompt_tokens``, ``completion_tokens``, ``total_tokens``, ``prompt_tokens_details.cached_tokens``,
      ``completion_tokens_details.reasoning_tokens``;
    * LiteLLM's normalisation of Anthropic: the same, with ``prompt_tokens`` including cache reads and writes,
      plus top-level ``cache_read_input_tokens`` / ``cache_creation_input_tokens`` and
      ``prompt_tokens_details.cache_creation_tokens``;
    * Anthropic raw: ``input_tokens`` (excluding cache reads and writes), ``output_tokens``,
      ``cache_read_input_tokens``, ``cache_creation_input_tokens``;
    * OpenAI Responses API: ``input_tokens`` (including cached and cache writes),
      ``input_tokens_details.cached_tokens`` / ``.cache_write_tokens``, ``output_tokens``,
      ``output_tokens_details.reasoning_tokens``;
    * the gateway's own count where the provider reported none and the answer needs one (OpenAI's schema
      requires ``usage`` on embeddings): any of the above with ``"estimated": true``, recorded as estimated.
    """
    if not usage or not isinstance(usage, Mapping):
        return None
    cache_read = _count(usage.get("cache_read_input_tokens"))
    cache_write = _count(usage.get("cache_creation_input_tokens"))
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None and (raw_input := _count(usage.get("input_tokens"))) is not None:
        prompt = raw_input + (cache_read or 0) + (cache_write or 0)  # Anthropic's input_tokens excludes them
    completion = _first(_count(usage.get("completion_tokens")), _count(usage.get("output_tokens")))
    total = _count(usage.get("total_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    prompt, completion = prompt or 0, completion or 0
    cached = _first(_detail(usage, "prompt_tokens_details", "cached_tokens"),
                    _detail(usage, "input_tokens_details", "cached_tokens"), cache_read) or 0
    creation = _first(cache_write, _detail(usage, "prompt_tokens_details", "cache_creation_tokens"),
                      _detail(usage, "input_tokens_details", "cache_write_tokens")) or 0
    reasoning = _first(_detail(usage, "completion_tokens_details", "reasoning_tokens"),
                       _detail(usage, "output_tokens_details", "reasoning_tokens")) or 0
    cached = min(cached, prompt)
    creation = min(creation, prompt - cached)
    reasoning = min(reasoning, completion)
    if total is None or (total == 0 and prompt + completion > 0):
        total = prompt + completion
    return TokenUsage(prompt=prompt, completion=completion, total=total, cached=cached, reasoning=reasoning,
                      estimated=usage.get("estimated") is True, cache_creation=creation)


# Token estimates run on the event loop, so their cost is bounded whatever the request: up to EXACT_CHARS of text
# (and EXACT_MESSAGES messages) LiteLLM counts the messages exactly; beyond, SAMPLES evenly spaced windows of the
# text, SAMPLE_CHARS in all, are counted and the count is scaled to the whole text, plus LiteLLM's per-message
# overhead. HuggingFace tokenizers are never used: LiteLLM downloads the llama and cohere ones from the Hub on
# first use (a blocking network fetch inside the event loop), and its "anthropic" one is Claude 2's — no closer
# to Claude 3+ than tiktoken, and 5–8 times slower.
EXACT_CHARS = 8192
EXACT_MESSAGES = 16
SAMPLE_CHARS = 8192
SAMPLES = 16
TOKENS_PER_MESSAGE = 4  # LiteLLM's 3 per message, and ~1 for the role
IMAGE_TOKENS = 250  # LiteLLM's DEFAULT_IMAGE_TOKEN_COUNT


def _rough_tokens(text_length: int) -> int:
    return (text_length + 3) // 4  # ~4 characters per token in English text: the fallback of last resort


def rough_tokens(text_length: int) -> int:
    """Tokens of a text known only by its length (~4 characters per token)."""
    return _rough_tokens(max(0, text_length))


@lru_cache(maxsize=1024)
def _custom_tokenizer(model: str) -> dict[str, Any] | None:
    """tiktoken (LiteLLM's choice of encoding for the model) where LiteLLM would pick a HuggingFace tokenizer."""
    try:
        from litellm.utils import huggingface_tokenizer_kind

        hugging_face = huggingface_tokenizer_kind(model) is not None
    except Exception:  # a LiteLLM without that helper: its usual triggers
        lowered = model.lower()
        hugging_face = any(word in lowered for word in ("claude", "llama", "command-r", "replicate"))
    if not hugging_face:
        return None
    try:
        from litellm._lazy_imports import get_default_encoding

        encoding: Any = get_default_encoding()
    except Exception:
        encoding = None  # LiteLLM picks the encoding from the model name on this path anyway
    return {"type": "openai_tokenizer", "tokenizer": encoding}


def _count_text(model: str, text: str) -> int:
    """Tokens of a text, exact up to EXACT_CHARS, extrapolated from evenly spaced samples beyond."""
    if not text:
        return 0
    if len(text) <= EXACT_CHARS:
        sample, scale = text, 1.0
    else:
        width = SAMPLE_CHARS // SAMPLES
        last = len(text) - width
        sample = "".join(text[last * i // (SAMPLES - 1):][:width] for i in range(SAMPLES))
        scale = len(text) / len(sample)
    try:
        counted = litellm.token_counter(model=model, custom_tokenizer=_custom_tokenizer(model), text=sample,
                                        count_response_tokens=True)
    except Exception:
        log.debug("token_counter failed for %s; using a character estimate", model, exc_info=True)
        return _rough_tokens(len(text))
    return round(counted * scale)


def _message_texts(messages: list[dict]) -> tuple[list[str], int]:
    """The texts of a conversation (contents, text parts, tool calls) and its number of images."""
    texts: list[str] = []
    images = 0
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping):
                    if isinstance(part.get("text"), str):
                        texts.append(part["text"])
                    elif part.get("type") == "image_url":
                        images += 1
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():  # any other shape: nothing to count
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                texts.extend(v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str))
        if isinstance(message.get("name"), str):
            texts.append(message["name"])
    return texts, images


def estimate_prompt_tokens(model: str, messages: list[dict]) -> int:
    """Prompt tokens of ``messages`` as LiteLLM counts them (``litellm.token_counter``), at a bounded cost (see
    EXACT_CHARS). Never fetches anything (images count LiteLLM's default 250 tokens), never raises."""
    if not messages or not isinstance(messages, list):
        return 0
    try:
        texts, images = _message_texts(messages)
    except Exception:  # a shape nobody foresaw: a count is not worth a failed response
        log.debug("could not read the messages' texts; estimating from their JSON", exc_info=True)
        return _rough_tokens(len(json.dumps(messages, default=str)))
    chars = sum(map(len, texts))
    try:
        if chars <= EXACT_CHARS and len(messages) <= EXACT_MESSAGES:
            return int(litellm.token_counter(model=model, custom_tokenizer=_custom_tokenizer(model),
                                             messages=messages, use_default_image_token_count=True))
        return (_count_text(model, "\n".join(texts)) + TOKENS_PER_MESSAGE * len(messages) + 3
                + IMAGE_TOKENS * images)
    except Exception:
        log.debug("token_counter failed for %s; using a character estimate", model, exc_info=True)
        return _rough_tokens(chars) + TOKENS_PER_MESSAGE * len(messages) + 3 + IMAGE_TOKENS * images


def warm_up(models: tuple[str, ...] = ("gpt-4o-mini", "gpt-4")) -> None:
    """Load the tiktoken encodings (o200k, cl100k: ~0.2–0.5 s each, once per process) before the first request
    needs them; LiteLLM keeps them for the life of the process."""
    for model in models:
        estimate_prompt_tokens(model, [{"role": "user", "content": "warm up"}])


def estimate_completion_tokens(model: str, text: str) -> int:
    """Tokens of a completion's text (bounded cost, as estimate_prompt_tokens)."""
    return _count_text(model, text)


def estimate_usage(model: str, messages: list[dict], completion_text: str) -> TokenUsage:
    """Usage counted by the gateway, for when the provider reported none: marked ``estimated``."""
    prompt = estimate_prompt_tokens(model, messages)
    completion = estimate_completion_tokens(model, completion_text)
    return TokenUsage(prompt=prompt, completion=completion, total=prompt + completion, cached=0, reasoning=0,
                      estimated=True)
