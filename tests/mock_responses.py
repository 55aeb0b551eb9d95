"""OpenAI's ``POST /v1/responses`` for the mock provider, on OpenAI's real wire format (JSON, and the typed SSE
stream: ``event: <type>`` + ``data:`` lines, a ``sequence_number`` on every event, no ``[DONE]``).

The shapes follow the OpenAI Python SDK's ``openai.types.responses`` (``Response``, ``ResponseOutputMessage``,
``ResponseFunctionToolCall``, ``ResponseReasoningItem``, the ``Response*Event`` types): fields OpenAI sends as null
are sent as null, ``logprobs: []`` on text parts and text events, an ``obfuscation`` string on deltas.

Behaviour comes from the model name's tokens, as for chat (mock_provider's docstring): ``err-<code>``,
``ra-<s>``, ``slow-<ms>``, ``drip-<ms>``, ``cut-<n>`` (n delta events, then the connection is closed),
``malformed``, ``cached-<n>``, ``reasoning-<n>`` (adds a reasoning output item and reasoning tokens),
``words-<n>``, and ``tool``: a ``function_call`` to the first function tool (or the one ``tool_choice`` names)
unless the input already holds a ``function_call_output``, in which case the model answers in text.
With ``text.format`` of type ``json_schema`` the reply is a JSON object built from the schema's properties.

Token counts: input = words of ``instructions`` and of every input text (message contents and ``input_text``
parts, function call arguments, function call outputs); output = words of the reply (or of the call's
arguments) + reasoning tokens.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mock_provider import _SAMPLES, Behaviour, _pieces, openai_error

if TYPE_CHECKING:
    from mock_provider import MockProvider


def _texts(value: Any) -> list[str]:
    """The texts of an input: a string, or a list of items / content parts."""
    if isinstance(value, str):
        return [value]
    texts: list[str] = []
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind in ("input_text", "output_text") and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif kind == "function_call" and isinstance(item.get("arguments"), str):
            texts.append(item["arguments"])
        elif kind == "function_call_output" and isinstance(item.get("output"), str):
            texts.append(item["output"])
        elif kind in (None, "message"):
            texts.extend(_texts(item.get("content")))
    return texts


def _last_user_text(body: dict) -> str:
    value = body.get("input")
    if isinstance(value, str):
        return value
    users = [i for i in value or [] if isinstance(i, dict) and i.get("role") == "user"]
    return " ".join(_texts(users[-1].get("content"))) if users else ""


def _function(body: dict) -> tuple[str, dict] | None:
    """(name, JSON schema) of the function to call: the one tool_choice names, else the first function tool."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    wanted = choice.get("name") if isinstance(choice, dict) else None
    tool = next((t for t in tools if t.get("name") == wanted), tools[0])
    return str(tool.get("name", "")), tool.get("parameters") or {}


def _sample(schema: dict) -> str:
    props = schema.get("properties") or {}
    return json.dumps({k: _SAMPLES.get(isinstance(v, dict) and v.get("type"), "mock") for k, v in props.items()})


def _echo(tool: Any) -> Any:
    """A tool as OpenAI echoes it in a Response (function tools are strict unless told otherwise)."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return tool
    return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict", True)}


def _answered_tool(body: dict) -> bool:
    items = body.get("input")
    return isinstance(items, list) and any(isinstance(i, dict) and i.get("type") == "function_call_output"
                                           for i in items)


class Plan:
    """The deterministic answer to one request."""

    def __init__(self, body: dict, behaviour: Behaviour) -> None:
        self.body, self.model = body, str(body["model"])
        self.id = "resp_" + secrets.token_hex(24)
        self.created = int(time.time())
        self.prompt = sum(len(t.split()) for t in _texts(body.get("input")) + _texts(body.get("instructions")))
        self.cached = min(behaviour.cached, self.prompt)
        self.reasoning = behaviour.reasoning
        function = _function(body) if behaviour.tool and not _answered_tool(body) else None
        self.call: dict[str, str] | None = None
        fmt = (body.get("text") or {}).get("format") or {}
        if function is not None:
            self.call = {"id": "fc_" + secrets.token_hex(24), "call_id": "call_" + secrets.token_hex(12),
                         "name": function[0], "arguments": _sample(function[1])}
            words = len(self.call["arguments"].split())
            self.text = ""
        else:
            if fmt.get("type") == "json_schema":
                self.text = _sample(fmt.get("schema") or {})
            elif behaviour.words is not None:
                self.text = " ".join(f"w{i}" for i in range(1, behaviour.words + 1))
            else:
                self.text = f"Hello from {self.model}: {' '.join(_last_user_text(body).split()[:20])}".rstrip()
            words = len(self.text.split())
        self.completion = words + self.reasoning
        self.message_id = "msg_" + secrets.token_hex(24)
        self.reasoning_id = "rs_" + secrets.token_hex(24)

    # -- items ----------------------------------------------------------------------------------------------
    def reasoning_item(self) -> dict:
        return {"id": self.reasoning_id, "type": "reasoning", "summary": []}

    def part(self, text: str) -> dict:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def message(self, status: str, content: list[dict]) -> dict:
        return {"id": self.message_id, "type": "message", "status": status, "content": content, "role": "assistant"}

    def function_call(self, status: str, arguments: str) -> dict:
        assert self.call is not None
        return {"id": self.call["id"], "type": "function_call", "status": status, "arguments": arguments,
                "call_id": self.call["call_id"], "name": self.call["name"]}

    def output(self) -> list[dict]:
        items = [self.reasoning_item()] if self.reasoning else []
        if self.call is not None:
            return [*items, self.function_call("completed", self.call["arguments"])]
        return [*items, self.message("completed", [self.part(self.text)])]

    def usage(self) -> dict:
        return {"input_tokens": self.prompt,
                "input_tokens_details": {"cached_tokens": self.cached, "cache_write_tokens": 0},
                "output_tokens": self.completion, "output_tokens_details": {"reasoning_tokens": self.reasoning},
                "total_tokens": self.prompt + self.completion}

    def response(self, status: str) -> dict:
        """The Response object, as OpenAI sends it (``in_progress``: no output, no usage yet)."""
        body, done = self.body, status == "completed"
        fmt = (body.get("text") or {}).get("format") or {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "billing": {"payer": "developer"},
            "completed_at": int(time.time()) if done else None, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None, "model": self.model, "output": self.output() if done else [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
            "prompt_cache_key": None, "prompt_cache_retention": None,
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
            "safety_identifier": None, "service_tier": "default", "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0), "text": {"format": fmt, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"), "tools": [_echo(t) for t in body.get("tools") or []],
            "top_logprobs": 0,
            "top_p": body.get("top_p", 1.0), "truncation": "disabled", "metadata": body.get("metadata") or {},
            **({"usage": self.usage()} if done else {}), **({"user": body["user"]} if "user" in body else {}),
        }

    # -- the stream -----------------------------------------------------------------------------------------
    def events(self) -> tuple[list[dict], list[dict], list[dict]]:
        """(preamble, deltas, tail) of the stream, without sequence numbers."""
        preamble = [{"type": "response.created", "response": self.response("in_progress")},
                    {"type": "response.in_progress", "response": self.response("in_progress")}]
        tail: list[dict] = []
        index = 0
        if self.reasoning:
            item = self.reasoning_item()
            preamble += [{"type": "response.output_item.added", "output_index": 0, "item": item},
                         {"type": "response.output_item.done", "output_index": 0, "item": item}]
            index = 1
        if self.call is not None:
            call_id, arguments = self.call["id"], self.call["arguments"]
            preamble.append({"type": "response.output_item.added", "output_index": index,
                             "item": self.function_call("in_progress", "")})
            deltas = [{"type": "response.function_call_arguments.delta", "item_id": call_id, "output_index": index,
                       "delta": p, "obfuscation": secrets.token_urlsafe(6)} for p in _pieces(arguments)]
            tail += [{"type": "response.function_call_arguments.done", "item_id": call_id, "output_index": index,
                      "name": self.call["name"], "arguments": arguments},
                     {"type": "response.output_item.done", "output_index": index,
                      "item": self.function_call("completed", arguments)}]
        else:
            where = {"item_id": self.message_id, "output_index": index, "content_index": 0}
            preamble += [{"type": "response.output_item.added", "output_index": index,
                          "item": self.message("in_progress", [])},
                         {"type": "response.content_part.added", **where, "part": self.part("")}]
            deltas = [{"type": "response.output_text.delta", **where, "delta": p, "logprobs": [],
                       "obfuscation": secrets.token_urlsafe(6)} for p in _pieces(self.text)]
            tail += [{"type": "response.output_text.done", **where, "text": self.text, "logprobs": []},
                     {"type": "response.content_part.done", **where, "part": self.part(self.text)},
                     {"type": "response.output_item.done", "output_index": index,
                      "item": self.message("completed", [self.part(self.text)])}]
        tail.append({"type": "response.completed", "response": self.response("completed")})
        return preamble, deltas, tail


def _event(data: dict, sequence: int) -> bytes:
    data = {"type": data["type"], "sequence_number": sequence, **data}
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def answer(mock: MockProvider, request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``."""
    body = await mock._record(request)
    headers = {"x-request-id": "req_" + uuid.uuid4().hex}
    if mock.required_key is not None and request.headers.get("Authorization") != f"Bearer {mock.required_key}":
        return web.json_response(openai_error(401, "Incorrect API key provided."), status=401, headers=headers)
    if body is None or not isinstance(body.get("model"), str) or "input" not in body:
        return web.json_response(openai_error(400, "The request body is not a JSON object with model and input."),
                                 status=400, headers=headers)
    behaviour = Behaviour.parse(body["model"])
    await asyncio.sleep(behaviour.slow / 1000)
    if behaviour.err is not None:
        if behaviour.ra is not None:
            headers["Retry-After"] = str(behaviour.ra)
        message = f"Mock error {behaviour.err} for model {body['model']}."
        return web.json_response(openai_error(behaviour.err, message), status=behaviour.err, headers=headers)
    plan = Plan(body, behaviour)
    if not body.get("stream"):
        if behaviour.cut is not None:
            return mock._cut(request, web.Response(status=200))
        if behaviour.malformed:
            return web.Response(text='{"id": "oops", not json', content_type="application/json", headers=headers)
        return web.json_response(plan.response("completed"), headers=headers)
    preamble, deltas, tail = plan.events()
    cut = behaviour.cut
    items = preamble + deltas + tail if cut is None else preamble + deltas[:cut] if cut else []
    events = [_event(item, i) for i, item in enumerate(items)]
    if behaviour.malformed:
        events.insert(0, b'event: response.created\ndata: {"type": "oops", not json\n\n')
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache"})
    mock.active_streams += 1
    try:
        await resp.prepare(request)
        for i, event in enumerate(events):
            if i and behaviour.drip:
                await asyncio.sleep(behaviour.drip / 1000)
            await resp.write(event)
        if cut is not None:
            return mock._cut(request, resp)
        await resp.write_eof()
    except ConnectionError:
        pass
    finally:
        mock.active_streams -= 1
    return resp
