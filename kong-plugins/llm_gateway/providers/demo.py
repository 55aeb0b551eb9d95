"""The built-in demo provider: an OpenAI-compatible endpoint inside the plugin server, so a fresh gateway
answers without any API key. Deployments with ``model: demo/<name>`` reach it through LiteLLM's OpenAI
provider exactly like a real provider, over HTTP on loopback. Its answers, chunks and errors are shaped
exactly as OpenAI's schema says (nullable fields present as null), as the conformance tests check.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

WORD_DELAY = 0.02  # seconds between streamed words, so a demo stream visibly streams


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


def demo_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    return app
