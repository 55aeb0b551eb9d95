"""Embedding endpoints of the mock provider, on their real wire formats (registered by ``mock_provider``).

* OpenAI ``POST /v1/embeddings``: ``input`` as a string, strings, token ids or token-id arrays (validated as
  OpenAI does, with its ``'$.input' is invalid`` 400), ``dimensions`` (refused on ``ada`` models, as OpenAI
  refuses it there), ``encoding_format`` ``float`` or ``base64`` (little-endian float32 bytes, base64, as
  OpenAI sends them), ``usage: {prompt_tokens, total_tokens}``. Point ``openai/<model>`` at ``mock.openai_base``.
* Cohere ``POST /v2/embed``: ``texts`` (1 to 96), ``input_type`` required, ``embedding_types`` (float only
  here; Cohere's default), ``output_dimension`` (256, 512, 1024 or 1536, and only on ``embed-v4`` models, as
  Cohere says), answered ``{"id", "embeddings": {"float": [...]}, "texts", "meta": {"api_version",
  "billed_units": {"input_tokens"}}, "response_type": "embeddings_by_type"}``; errors are Cohere's
  ``{"message": ...}``. LiteLLM's Cohere embedding config posts to its ``api_base`` as the whole URL, so point
  ``cohere/<model>`` at ``mock.base_url + "/v2/embed"``.

Behaviours come from the model name as in ``mock_provider`` (``err-<code>``, ``ra-<s>``, ``slow-<ms>``,
``malformed``), plus ``nousage``: OpenAI format without ``usage`` (as some self-hosted servers answer), and
Cohere without ``billed_units``. Vectors are deterministic (``mock_vector``): MOCK_DIMENSIONS values unless
dimensions are asked, each a multiple of 1/128 in [-1, 1), exact in float32, so the base64 and float forms
decode to the same numbers. Tokens: a string's whitespace-separated words (at least 1), a token array's length.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import struct
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from mock_provider import MockProvider

MOCK_DIMENSIONS = 8
COHERE_MAX_TEXTS = 96
COHERE_DIMENSIONS = (256, 512, 1024, 1536)
COHERE_INPUT_TYPES = ("search_document", "search_query", "classification", "clustering", "image")
OPENAI_INVALID_INPUT = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."


def mock_vector(item: str | list[int], dimensions: int = MOCK_DIMENSIONS) -> list[float]:
    """The mock's embedding of one input: bytes of a SHA-256 stream seeded by the input, as k/128."""
    seed = (item if isinstance(item, str) else json.dumps(item)).encode()
    stream = b""
    counter = 0
    while len(stream) < dimensions:
        stream += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return [(b - 128) / 128 for b in stream[:dimensions]]


def tokens_of(item: str | list[int]) -> int:
    return max(1, len(item.split())) if isinstance(item, str) else len(item)


def as_base64(vector: list[float]) -> str:
    """What OpenAI sends for ``encoding_format: base64``: the float32 values, little-endian, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _is_token(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def openai_inputs(value: Any) -> list[str | list[int]] | None:
    """The inputs of an OpenAI embeddings request, or None when OpenAI would refuse ``input``."""
    if isinstance(value, str):
        return [value] if value else None
    if not isinstance(value, list) or not 1 <= len(value) <= 2048:
        return None
    if all(isinstance(v, str) and v for v in value):
        return list(value)
    if all(_is_token(v) for v in value):
        return [list(value)]
    if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
        return [list(v) for v in value]
    return None


def _openai_error(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status)


def _cohere_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"message": message}, status=status, headers=headers)


async def openai_embeddings(mock: MockProvider, request: web.Request) -> web.Response:
    from mock_provider import Behaviour

    body = await mock._record(request)  # every request is recorded, as the mock's others are
    if mock.required_key is not None and request.headers.get("Authorization") != f"Bearer {mock.required_key}":
        return _openai_error(401, "Incorrect API key provided.", "invalid_api_key")
    if body is None or not isinstance(body.get("model"), str):
        return _openai_error(400, "The request body is not a JSON object with a model.")
    model = body["model"]
    behaviour = Behaviour.parse(model)
    await asyncio.sleep(behaviour.slow / 1000)
    if behaviour.err is not None:
        response = _openai_error(behaviour.err, f"Mock error {behaviour.err} for model {model}.")
        if behaviour.ra is not None:
            response.headers["Retry-After"] = str(behaviour.ra)
        return response
    inputs = openai_inputs(body.get("input"))
    if inputs is None:
        return _openai_error(400, OPENAI_INVALID_INPUT)
    dimensions = body.get("dimensions", MOCK_DIMENSIONS)
    if "dimensions" in body and "ada" in model.split("-"):
        return _openai_error(400, "This model does not support specifying dimensions.")
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= 4096:
        return _openai_error(400, f"Invalid 'dimensions': {dimensions!r}.", param="dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        return _openai_error(400, f"Invalid value for 'encoding_format': {encoding!r}.", param="encoding_format")
    if behaviour.malformed:
        return web.Response(text='{"object": "list", not json', content_type="application/json")
    data = []
    for i, item in enumerate(inputs):
        vector = mock_vector(item, dimensions)
        data.append({"object": "embedding", "index": i,
                     "embedding": as_base64(vector) if encoding == "base64" else vector})
    answer: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if "nousage" not in model.split("-"):
        prompt = sum(map(tokens_of, inputs))
        answer["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return web.json_response(answer, headers={"x-request-id": "req_" + uuid.uuid4().hex})


async def cohere_embed(mock: MockProvider, request: web.Request) -> web.Response:
    """Cohere's Embed API v2 (docs.cohere.com/reference/embed), texts only."""
    from mock_provider import Behaviour

    body = await mock._record(request)  # every request is recorded, as the mock's others are
    if mock.required_key is not None and request.headers.get("Authorization") != f"Bearer {mock.required_key}":
        return _cohere_error(401, "invalid api token")
    if body is None or not isinstance(body.get("model"), str) or not body["model"]:
        return _cohere_error(400, "invalid request: model is required")
    model = body["model"]
    behaviour = Behaviour.parse(model)
    await asyncio.sleep(behaviour.slow / 1000)
    if behaviour.err is not None:
        headers = {"Retry-After": str(behaviour.ra)} if behaviour.ra is not None else None
        message = ("You are using a Trial key, which is limited to 5 API calls / minute."
                   if behaviour.err == 429 else f"Mock error {behaviour.err} for model {model}.")
        return _cohere_error(behaviour.err, message, headers)
    texts = body.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return _cohere_error(400, "invalid request: texts must be a non-empty list of strings")
    if len(texts) > COHERE_MAX_TEXTS:
        return _cohere_error(400, f"invalid request: total number of texts must be at most {COHERE_MAX_TEXTS} - "
                                  f"received {len(texts)}")
    if body.get("input_type") not in COHERE_INPUT_TYPES:
        return _cohere_error(400, "invalid request: valid input_type must be provided with the provided model")
    types = body.get("embedding_types", ["float"])
    if types != ["float"]:
        return _cohere_error(400, f"invalid request: the mock only serves float embeddings, not {types}")
    dimensions = body.get("output_dimension")
    if dimensions is not None:
        if "v4" not in model:
            return _cohere_error(400, "invalid request: output_dimension is only supported for embed-v4.0 and "
                                      "newer models")
        if dimensions not in COHERE_DIMENSIONS:
            return _cohere_error(400, "invalid request: output_dimension must be one of 256, 512, 1024, 1536")
    if behaviour.malformed:
        return web.Response(text='{"id": "oops", not json', content_type="application/json")
    meta: dict[str, Any] = {"api_version": {"version": "2"}}
    if "nousage" not in model.split("-"):
        meta["billed_units"] = {"input_tokens": sum(map(tokens_of, texts))}
    return web.json_response({
        "id": str(uuid.uuid4()),
        "embeddings": {"float": [mock_vector(t, dimensions or MOCK_DIMENSIONS) for t in texts]},
        "texts": texts, "meta": meta, "response_type": "embeddings_by_type",
    })


def add_routes(app: web.Application, mock: MockProvider) -> None:
    """The embedding routes, before the mock's catch-all."""
    app.router.add_post("/v1/embeddings", functools.partial(openai_embeddings, mock))
    app.router.add_post("/v2/embed", functools.partial(cohere_embed, mock))
