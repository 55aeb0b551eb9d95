"""More of Anthropic's Messages API on the mock provider, for the ``/v1/messages`` tests: count_tokens, extended
thinking, prompt-cache writes and a provider ``error`` event mid-stream.

``register(app, mock)`` adds, on the mock's port:

* ``POST /v1/messages/count_tokens`` (and under ``/extras``): ``{"input_tokens": N}`` where N is the mock's
  deterministic prompt count (whitespace-separated words of the messages' and the system's text; see
  mock_provider) plus one per tool, so a test can tell the provider's count from LiteLLM's tokenizer.
  Model tokens: ``err-<code>`` answers that error instead.
* ``POST /extras/v1/messages``: point ``anthropic/<model>`` at ``mock.base_url + "/extras"``. The reply is the
  mock's usual one (echo, ``words-<n>``, ``tool``, ``cached-<n>``, ``err-<code>``, ``slow-<ms>``), and the model
  name may also ask for:

  ===============  ===========================================================================================
  ``think``        a ``thinking`` block first (``"Thinking about: <echo>"``, with a signature), streamed as
                   ``thinking_delta`` events and a ``signature_delta``
  ``cwrite-<n>``   n of the uncached prompt tokens reported as ``cache_creation_input_tokens``
  ``errmid``       streams: after the first content delta, an ``event: error`` (overloaded_error) and the end
  ``fullusage``    streams: the final ``message_delta`` carries all four counts, as Anthropic's API does now
                   (by default only ``output_tokens``, as older versions and Bedrock do)
  ===============  ===========================================================================================
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mock_provider import Behaviour, _pieces, _sse, anthropic_error, plan_reply

if TYPE_CHECKING:
    from mock_provider import MockProvider, Reply

EXTRAS = "/extras"
SIGNATURE = "mock-signature-" + "0" * 16


def register(app: web.Application, mock: MockProvider) -> None:
    """Add the extra routes (before the mock's catch-all)."""
    extras = _Extras(mock)
    for prefix in ("", EXTRAS):
        app.router.add_post(prefix + "/v1/messages/count_tokens", extras.count_tokens)
    app.router.add_post(EXTRAS + "/v1/messages", extras.messages)


def _number(model: str, name: str) -> int:
    for token, value in itertools.pairwise(model.split("-")):
        if token == name and value.isdigit():
            return int(value)
    return 0


class _Extras:
    def __init__(self, mock: MockProvider) -> None:
        self.mock = mock

    async def _admit(self, request: web.Request) -> tuple[dict | None, web.Response | None]:
        body = await self.mock._record(request)
        headers = {"request-id": "req_" + uuid.uuid4().hex}
        if self.mock.required_key is not None and request.headers.get("x-api-key") != self.mock.required_key:
            return None, web.json_response(anthropic_error(401, "invalid x-api-key"), status=401, headers=headers)
        if body is None or not isinstance(body.get("model"), str):
            return None, web.json_response(anthropic_error(400, "The request body is not a JSON object with a model."),
                                           status=400, headers=headers)
        behaviour = Behaviour.parse(body["model"])
        await asyncio.sleep(behaviour.slow / 1000)
        if behaviour.err is not None:
            message = f"Mock error {behaviour.err} for model {body['model']}."
            return None, web.json_response(anthropic_error(behaviour.err, message), status=behaviour.err,
                                           headers=headers)
        return body, None

    async def count_tokens(self, request: web.Request) -> web.Response:
        body, refused = await self._admit(request)
        if refused is not None:
            return refused
        assert body is not None
        reply = plan_reply(body, Behaviour())
        return web.json_response({"input_tokens": reply.prompt + len(body.get("tools") or [])})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, refused = await self._admit(request)
        if refused is not None:
            return refused
        assert body is not None
        model = body["model"]
        behaviour = Behaviour.parse(model)
        reply = plan_reply(body, behaviour)
        think = "think" in model.split("-")
        writes = min(_number(model, "cwrite"), reply.prompt - reply.cached)
        thinking = f"Thinking about: {reply.text or 'the tool'}" if think else None
        if not body.get("stream"):
            return web.json_response(_message(model, reply, thinking, writes))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        for event in _events(model, reply, thinking, writes, mid_error="errmid" in model.split("-"),
                             full_usage="fullusage" in model.split("-")):
            await response.write(event.encode())
        await response.write_eof()
        return response


def _usage(reply: Reply, writes: int, output: int) -> dict[str, Any]:
    return {"input_tokens": reply.prompt - reply.cached - writes, "cache_creation_input_tokens": writes,
            "cache_read_input_tokens": reply.cached, "output_tokens": output}


def _answer_block(reply: Reply) -> dict[str, Any]:
    if reply.tool is None:
        return {"type": "text", "text": reply.text}
    return {"type": "tool_use", "id": "toolu_" + reply.tool["id"], "name": reply.tool["name"],
            "input": json.loads(reply.tool["arguments"])}


def _message(model: str, reply: Reply, thinking: str | None, writes: int) -> dict[str, Any]:
    content = ([{"type": "thinking", "thinking": thinking, "signature": SIGNATURE}] if thinking else [])
    content.append(_answer_block(reply))
    output = reply.completion + (len(thinking.split()) if thinking else 0)
    return {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": "end_turn" if reply.tool is None else "tool_use",
            "stop_sequence": None, "usage": _usage(reply, writes, output)}


def _events(model: str, reply: Reply, thinking: str | None, writes: int, *, mid_error: bool,
            full_usage: bool) -> list[str]:
    def event(name: str, **data: Any) -> str:
        return _sse({"type": name, **data}, name)

    start = {**_message(model, reply, thinking, writes), "content": [], "stop_reason": None}
    start["usage"] = _usage(reply, writes, 1)
    events = [event("message_start", message=start), event("ping")]
    index = 0
    if thinking:
        events.append(event("content_block_start", index=0,
                            content_block={"type": "thinking", "thinking": "", "signature": ""}))
        events += [event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": p})
                   for p in _pieces(thinking)]
        events.append(event("content_block_delta", index=0, delta={"type": "signature_delta",
                                                                   "signature": SIGNATURE}))
        events.append(event("content_block_stop", index=0))
        index = 1
    block = _answer_block(reply)
    if reply.tool is None:
        events.append(event("content_block_start", index=index, content_block={"type": "text", "text": ""}))
        deltas = [{"type": "text_delta", "text": p} for p in _pieces(reply.text)]
    else:
        events.append(event("content_block_start", index=index, content_block={**block, "input": {}}))
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in _pieces(reply.tool["arguments"])]
    deltas_sent = [event("content_block_delta", index=index, delta=d) for d in deltas]
    if mid_error:
        return [*events, *deltas_sent[:1],
                _sse(anthropic_error(529, "Overloaded"), "error")]
    output = reply.completion + (len(thinking.split()) if thinking else 0)
    final = _usage(reply, writes, output) if full_usage else {"output_tokens": output}
    stop = {"stop_reason": "end_turn" if reply.tool is None else "tool_use", "stop_sequence": None}
    return [*events, *deltas_sent, event("content_block_stop", index=index),
            event("message_delta", delta=stop, usage=final), event("message_stop")]
