"""The endpoints the listener serves: LLM endpoints through the common pipeline, and those the gateway answers
itself. A new endpoint is one module in api/ and one line here (and its route in kong.yml)."""

from __future__ import annotations

from llm_gateway.api import chat_completions, completions, count_tokens, embeddings, messages, models, responses
from llm_gateway.api.base import DirectEndpoint, Endpoint

ENDPOINTS: tuple[Endpoint, ...] = (
    chat_completions.ENDPOINT,
    completions.ENDPOINT,
    embeddings.ENDPOINT,
    messages.ENDPOINT,
    responses.ENDPOINT,
)

DIRECT_ENDPOINTS: tuple[DirectEndpoint, ...] = (
    models.ENDPOINT, models.RETRIEVE_ENDPOINT,
    count_tokens.ENDPOINT,
)
