"""``POST /v1/embeddings``: OpenAI's CreateEmbeddingRequest validated, and the answer in its CreateEmbeddingResponse.

The checks follow OpenAI's published schema: ``input`` is a non-empty string, or 1 to 2048 non-empty strings,
token ids, or non-empty token-id arrays (never a mix); ``dimensions`` an integer of at least 1;
``encoding_format`` ``float`` or ``base64``; ``user`` a string; anything else is refused by name, never
dropped, as on chat. Whether a deployment can honour ``dimensions`` or ``user`` (or take token ids) is decided
per deployment, in ``providers.embeddings``, like chat's parameters.

Embeddings are never streamed and have no completion: nothing for a budget to cap (``limit_keys`` is empty);
a request is charged its prompt tokens, reported by the provider or, when it reports none, counted here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llm_gateway.accounting.tokens import EXACT_MESSAGES, estimate_completion_tokens
from llm_gateway.api.base import OPENAI_ERRORS, ApiRequest, ErrorFormat
from llm_gateway.api.request_body import refuse_unknown, request_object
from llm_gateway.config import Deployment
from llm_gateway.errors import GatewayError, bad_request
from llm_gateway.providers import embeddings as provider
from llm_gateway.providers.openai_compatible import Usage

MAX_INPUTS = 2048  # OpenAI's maxItems for every array form of ``input``
MAX_TOKEN_ID = 2 ** 31 - 1  # token ids are vocabulary indices; anything larger is no token of any model
FIELDS = frozenset({"input", "model", "dimensions", "encoding_format", "user"})
ENCODINGS = ("float", "base64")

Inputs = str | list[str] | list[int] | list[list[int]]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_token(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= MAX_TOKEN_ID


def _token_error(tokens: list[Any], where: str) -> GatewayError | None:
    for j, token in enumerate(tokens):
        if not _is_token(token):
            return bad_request(f"'{where}[{j}]' must be a token id (an integer from 0 to {MAX_TOKEN_ID})",
                               param=f"{where}[{j}]")
    return None


def check_input(value: Any) -> Inputs:
    """``input`` as one of the schema's four forms; a 400 naming the first element that breaks it."""
    if isinstance(value, str):
        if not value:
            raise bad_request("'input' must not be an empty string", param="input")
        return value
    if not isinstance(value, list):
        raise bad_request("'input' must be a string, an array of strings, an array of token ids or an array of "
                          "token-id arrays", param="input")
    if not value:
        raise bad_request("'input' must not be an empty array", param="input")
    if len(value) > MAX_INPUTS:
        raise bad_request(f"'input' holds {len(value)} items; at most {MAX_INPUTS} are allowed", param="input")
    first = value[0]
    if isinstance(first, str):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise bad_request(f"'input[{i}]' must be a string, like input[0]", param=f"input[{i}]")
            if not item:
                raise bad_request(f"'input[{i}]' must not be an empty string", param=f"input[{i}]")
        return value
    if _is_int(first):
        if err := _token_error(value, "input"):
            raise err
        return value
    if isinstance(first, list):
        for i, item in enumerate(value):
            if not isinstance(item, list):
                raise bad_request(f"'input[{i}]' must be an array of token ids, like input[0]", param=f"input[{i}]")
            if not item:
                raise bad_request(f"'input[{i}]' must not be an empty array", param=f"input[{i}]")
            if err := _token_error(item, f"input[{i}]"):
                raise err
        return value
    raise bad_request("'input[0]' must be a string, a token id or an array of token ids", param="input[0]")


def items_of(inputs: Inputs) -> list[str] | list[list[int]]:
    """One entry per embedding the answer holds: a lone string or token array is one input."""
    if isinstance(inputs, str):
        return [inputs]
    if inputs and _is_int(inputs[0]):
        return [inputs]  # type: ignore[list-item]
    return inputs  # type: ignore[return-value]


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated request, as the ledger and the router see it (``api.base.ApiRequest``)."""

    model: str
    params: dict[str, Any]  # input and the parameters set (not null), as given
    endpoint: str = "embeddings"
    stream: bool = False
    limit_keys: tuple[str, ...] = ()  # an embedding has no completion for a budget to cap

    @property
    def count(self) -> int:
        """How many embeddings the answer holds."""
        return len(items_of(self.params["input"]))

    @property
    def encoding_format(self) -> str:
        return self.params.get("encoding_format", "float")

    def prompt_tokens(self, model: str) -> int:
        """The inputs' tokens on ``model``: a token array is its length; texts are counted as LiteLLM counts
        them (one by one up to EXACT_MESSAGES of them, else all at once, at the bounded cost of the estimate)."""
        items = items_of(self.params["input"])
        if isinstance(items[0], list):
            return sum(len(item) for item in items)
        texts: list[str] = items  # type: ignore[assignment]
        if len(texts) <= EXACT_MESSAGES:
            return sum(estimate_completion_tokens(model, text) for text in texts)
        return estimate_completion_tokens(model, " ".join(texts))

    def chat_view(self) -> dict[str, Any]:
        """Nothing to score: a routing alias sends embeddings to its weak alias."""
        return {"messages": []}


def parse_embedding_request(body: bytes) -> EmbeddingRequest:
    """Parse and validate a request body; raises GatewayError(400) naming the offending parameter."""
    data, model = request_object(body)
    refuse_unknown(data, FIELDS)
    if "input" not in data or data["input"] is None:
        raise bad_request("'input' is required", param="input")
    params: dict[str, Any] = {"input": check_input(data["input"])}
    dimensions = data.get("dimensions")
    if dimensions is not None:
        if not _is_int(dimensions) or dimensions < 1:
            raise bad_request("'dimensions': expected an integer of at least 1", param="dimensions")
        params["dimensions"] = dimensions
    encoding = data.get("encoding_format")
    if encoding is not None:
        if not isinstance(encoding, str) or encoding not in ENCODINGS:
            raise bad_request("'encoding_format': expected one of float, base64", param="encoding_format")
        params["encoding_format"] = encoding
    user = data.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise bad_request("'user': expected a string", param="user")
        params["user"] = user
    return EmbeddingRequest(model=model, params=params)


class EmbeddingsEndpoint:
    """OpenAI's embeddings endpoint, served by the common pipeline (``api.base.Endpoint``)."""

    name = "embeddings"
    path = "/v1/embeddings"
    errors: ErrorFormat = OPENAI_ERRORS
    stream_end = b""

    def parse(self, body: bytes) -> EmbeddingRequest:
        return parse_embedding_request(body)

    async def complete(self, deployment: Deployment, request: ApiRequest, usage: Usage) -> bytes:
        assert isinstance(request, EmbeddingRequest)
        return await provider.embed(deployment, request.params, request.count, usage,
                                    estimate=request.prompt_tokens)

    async def open_stream(self, deployment: Deployment, request: ApiRequest, usage: Usage) -> AsyncIterator[bytes]:
        """Never reached: embeddings have no stream (``stream`` is always False)."""
        raise bad_request("Embeddings cannot be streamed.", param="stream")


ENDPOINT = EmbeddingsEndpoint()
