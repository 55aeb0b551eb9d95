"""The built-in demo provider: an OpenAI-compatible endpoint inside the plugin server, so a fresh gateway
answers without any API key. Deployments with ``model: demo/<name>`` reach it through LiteLLM's OpenAI
provider exactly like a real provider, over HTTP on loopback. Its answers, chunks and errors are shaped
exactly as OpenAI's schema says (nullable fields present as null), as the conformance tests check.

Its embeddings (``/v1/embeddings``) are deterministic and mean a little: each word (lower-cased) or token id
is hashed to a signed position of the vector (the "hashing trick") and the vector is L2-normalised, so texts
that share words are closer than texts that share none, and a text always gets the same vector.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import struct
import time
import uuid
from typing import Any

from aiohttp import web

WORD_DELAY = 0.02  # seconds between streamed words, so a demo stream visibly streams
EMBEDDING_DIMENSIONS = 256  # the demo's vector size when the request names none
MAX_DIMENSIONS = 4096
_WORD = re.compile(r"\w+")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _reply(body: dict[str, Any]) -> tuple[list[str], int]:
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    prompt_words = sum(len(_text_of(m.get("content")).split()) for m in messages if isinstance(m, dict))
    last = next((_text_of(m.get("content")) for m in reversed(messages)
                 if isinstance(m, dict) and m.get("role") == "user"), "")
    echo = " ".join(last.split()[:30])
    words = f"Hello from the kong-llm-gateway demo provider. You said: {echo}".split()
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit > 0:
        words = words[:limit]
    return [w if i == 0 else " " + w for i, w in enumerate(words)], max(prompt_words, 1)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return web.json_response({"error": {"message": "The request body must be a JSON object.",
                                            "type": "invalid_request_error", "param": None,
                                            "code": "invalid_json"}}, status=400)
    pieces, prompt_tokens = _reply(body)
    base = {"id": f"chatcmpl-demo-{uuid.uuid4().hex[:12]}", "created": int(time.time()),
            "model": body.get("model", "demo")}
    if not body.get("stream"):
        return web.json_response({**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
            "logprobs": None, "finish_reason": "stop",
        }], "usage": _usage(prompt_tokens, len(pieces))})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    chunk = {**base, "object": "chat.completion.chunk"}

    async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
        await response.write(b"data: " + json.dumps({**chunk, "choices": choices, **extra}).encode() + b"\n\n")

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    await send(choice({"role": "assistant", "content": ""}))
    for piece in pieces:
        await asyncio.sleep(WORD_DELAY)
        await send(choice({"content": piece}))
    await send(choice({}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        await send([], usage=_usage(prompt_tokens, len(pieces)))
    await response.write(b"data: [DONE]\n\n")
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI's legacy text completions: the prompt (a string; anything else as one message) echoed back."""
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return web.json_response({"error": {"message": "The request body must be a JSON object.",
                                            "type": "invalid_request_error", "param": None,
                                            "code": "invalid_json"}}, status=400)
    prompt = body.get("prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
    text = " ".join(t for t in texts if isinstance(t, str))
    pieces, prompt_tokens = _reply({"messages": [{"role": "user", "content": text}],
                                    "max_tokens": body.get("max_tokens")})
    base = {"id": f"cmpl-demo-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model", "demo")}
    if not body.get("stream"):
        return web.json_response({**base, "choices": [{"index": 0, "text": "".join(pieces), "logprobs": None,
                                                       "finish_reason": "stop"}],
                                  "usage": _usage(prompt_tokens, len(pieces))})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
        await response.write(b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n")

    for piece in pieces:
        await asyncio.sleep(WORD_DELAY)
        await send([{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}])
    await send([{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}])
    if (body.get("stream_options") or {}).get("include_usage"):
        await send([], usage=_usage(prompt_tokens, len(pieces)))
    await response.write(b"data: [DONE]\n\n")
    return response


def _invalid(message: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": None}}, status=400)


def embedding(item: str | list[int], dimensions: int) -> list[float]:
    """A deterministic, normalised vector: each word or token id adds +-1 at the position its hash picks."""
    features = [f"t:{t}" for t in item] if isinstance(item, list) else _WORD.findall(item.lower()) or [item]
    vector = [0.0] * dimensions
    for feature in features:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        vector[int.from_bytes(digest[:4], "little") % dimensions] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0:  # the features' signs cancelled out: the first one's position, so no vector is zero
        digest = hashlib.blake2b(features[0].encode(), digest_size=8).digest()
        vector[int.from_bytes(digest[:4], "little") % dimensions] = norm = 1.0
    return [v / norm for v in vector]


def _embedding_inputs(value: Any) -> list[str | list[int]] | None:
    """The inputs of a request, one per embedding, in any of OpenAI's four forms; None for anything else."""
    def token(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if isinstance(value, str):
        return [value] if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) and v for v in value):
        return list(value)
    if all(token(v) for v in value):
        return [list(value)]
    if all(isinstance(v, list) and v and all(token(t) for t in v) for v in value):
        return [list(v) for v in value]
    return None


async def embeddings(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return _invalid("The request body must be a JSON object.")
    inputs = _embedding_inputs(body.get("input"))
    if inputs is None:
        return _invalid("'input' must be a non-empty string, or an array of strings or token ids.", "input")
    dimensions = body.get("dimensions", EMBEDDING_DIMENSIONS)
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= MAX_DIMENSIONS:
        return _invalid(f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}.", "dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        return _invalid("'encoding_format' must be float or base64.", "encoding_format")
    data: list[dict[str, Any]] = []
    for i, item in enumerate(inputs):
        vector: list[float] | str = embedding(item, dimensions)
        if encoding == "base64":  # OpenAI's: float32, little-endian, base64
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(max(1, len(item.split())) if isinstance(item, str) else len(item) for item in inputs)
    return web.json_response({"object": "list", "data": data, "model": body.get("model", "demo"),
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def demo_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    return app
