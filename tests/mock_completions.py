"""OpenAI's legacy ``POST /v1/completions`` for the mock provider (registered by ``MockProvider._serve``).

Same model-name behaviours as the chat routes (``err-<code>``, ``ra-<s>``, ``slow-<ms>``, ``drip-<ms>``,
``cut-<n>``, ``malformed``, ``words-<n>``; see mock_provider's docstring). The reply to each prompt is
``"Hello from <model>: <prompt>"`` (the prompt cut to 20 words; a token-id prompt is echoed as ``<n tokens>``),
one choice per prompt and per ``n``, cut to ``max_tokens`` words (finish_reason ``length``; default 16 as
OpenAI's), the prompt prepended with ``echo``. Token counts: prompt = words of every prompt (or its token
ids), completion = words of every choice. Streams send one word per ``text_completion`` chunk, a final chunk
with the finish reason per choice, then with ``stream_options.include_usage`` a ``choices: []`` usage chunk,
then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mock_provider import Behaviour, _pieces, _sse, openai_error

if TYPE_CHECKING:
    from mock_provider import MockProvider

DEFAULT_MAX_TOKENS = 16


def _prompts(prompt: Any) -> list[str]:
    """Each prompt of the request as text (token-id prompts as a placeholder of their length)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [f"<{len(prompt)} tokens>"]
    if isinstance(prompt, list):
        return [p if isinstance(p, str) else f"<{len(p)} tokens>" for p in prompt]
    return [""]


def _prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(len(p.split()) if isinstance(p, str) else len(p) for p in prompt)
    return 0


def plan(body: dict, behaviour: Behaviour) -> tuple[list[tuple[str, str]], int, int]:
    """([(text, finish_reason)] per choice, prompt tokens, completion tokens)."""
    model = str(body.get("model", ""))
    limit = body.get("max_tokens")
    limit = DEFAULT_MAX_TOKENS if limit is None else limit
    n = body.get("n") or 1
    choices = []
    for prompt in _prompts(body.get("prompt")):
        if behaviour.words is not None:
            words = [f"w{i}" for i in range(1, behaviour.words + 1)]
        else:
            words = f"Hello from {model}: {' '.join(prompt.split()[:20])}".split()
        finish = "length" if len(words) > limit else "stop"
        text = " ".join(words[:limit])
        if body.get("echo"):
            text = prompt + " " + text
        choices += [(text, finish)] * n
    completion = sum(len(t.split()) for t, _ in choices)
    return choices, _prompt_tokens(body.get("prompt")), completion


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def completions(mock: MockProvider, request: web.Request) -> web.StreamResponse:
    body = await mock._record(request)
    if mock.required_key is not None and request.headers.get("Authorization") != f"Bearer {mock.required_key}":
        return web.json_response(openai_error(401, "Incorrect API key provided."), status=401)
    if body is None or not isinstance(body.get("model"), str):
        return web.json_response(openai_error(400, "The request body is not a JSON object with a model."),
                                 status=400)
    model, behaviour = body["model"], Behaviour.parse(body["model"])
    await asyncio.sleep(behaviour.slow / 1000)
    if behaviour.err is not None:
        headers = {"Retry-After": str(behaviour.ra)} if behaviour.ra is not None else {}
        return web.json_response(openai_error(behaviour.err, f"Mock error {behaviour.err} for model {model}."),
                                 status=behaviour.err, headers=headers)
    choices, prompt, completion = plan(body, behaviour)
    base = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_mock"}
    if not body.get("stream"):
        if behaviour.malformed:
            return web.Response(text='{"id": "oops", not json', content_type="application/json")
        return web.json_response({**base, "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            for i, (text, finish) in enumerate(choices)], "usage": _usage(prompt, completion)})
    events = ['{"id": "oops", not json'] if behaviour.malformed else []
    for i, (text, _) in enumerate(choices):
        events += [{**base, "choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": None}]}
                   for piece in _pieces(text)]
    if behaviour.cut is not None:
        events = events[:behaviour.cut]
    else:
        events += [{**base, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": finish}]}
                   for i, (_, finish) in enumerate(choices)]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": _usage(prompt, completion)})
        events.append("[DONE]")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    try:
        await response.prepare(request)
        for i, event in enumerate(events):
            if i and behaviour.drip:
                await asyncio.sleep(behaviour.drip / 1000)
            await response.write(_sse(event).encode())
        if behaviour.cut is not None:
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
    except ConnectionError:
        pass
    return response


def handler(mock: MockProvider) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The route's handler for ``mock`` (its key, its recorded requests)."""
    async def handle(request: web.Request) -> web.StreamResponse:
        return await completions(mock, request)
    return handle
