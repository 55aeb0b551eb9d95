"""A real local HTTP server that plays LLM providers on their wire formats, for tests.

``MockProvider`` runs aiohttp on its own event loop in a daemon thread, bound to 127.0.0.1 on a free port:

* OpenAI ``POST /v1/chat/completions`` -- point LiteLLM's ``openai/<model>`` at ``mock.openai_base``
  (``base_url + "/v1"``; the OpenAI SDK appends ``/chat/completions``).
* Anthropic ``POST /v1/messages`` -- point ``anthropic/<model>`` at ``mock.anthropic_base`` (the bare
  ``base_url``: LiteLLM appends ``/v1/messages`` to any api_base not already ending with it).

Both answer JSON or SSE (``"stream": true``). With ``required_key`` set, a missing or wrong
``Authorization: Bearer <key>`` (OpenAI) or ``x-api-key`` (Anthropic) gets a 401 in that provider's error
format. Every request is recorded (header names lower-cased) in ``mock.requests``.

Behaviour is chosen by tokens of the upstream ``model`` name, separated by '-' and combinable
(e.g. ``mock-slow-300-cached-5``):

=================  ======================================================================================
(default)          reply ``"Hello from <model>: <last user message text>"`` (echo cut to 20 words and
                   whitespace-normalised); streamed one word per content chunk, spaces kept in the chunks
``err-<code>``     that HTTP status with the provider's error JSON; ``ra-<s>`` adds ``Retry-After: <s>``
``slow-<ms>``      wait before the response headers (JSON, streams and errors)
``drip-<ms>``      in streams, wait between events
``cut-<n>``        streams: n content chunks, then the connection is closed mid-body (no final chunk,
                   no ``[DONE]`` / ``message_stop``, no terminating HTTP chunk); ``cut-0`` closes right
                   after the headers. JSON: the connection is closed before any response.
``ctx``            400 as the provider says the prompt exceeds the context window (OpenAI: code
                   ``context_length_exceeded``; Anthropic: "prompt is too long")
``policy``         400 as the provider refuses on content policy (OpenAI: code ``content_policy_violation``)
``malformed``      JSON: 200 with a body that is not JSON; streams: the first data line is not JSON (the
                   normal events follow)
``cached-<n>``     n cached prompt tokens (capped at the prompt tokens)
``reasoning-<n>``  n reasoning tokens, included in the completion tokens (OpenAI also reports them in
                   ``completion_tokens_details.reasoning_tokens``; Anthropic only in ``output_tokens``)
``words-<n>``      reply exactly ``"w1 w2 ... wn"`` instead of the echo
``cookie``         the answer sets a cookie (``Set-Cookie: mock_session=<new id>``), as a CDN in front of a
                   provider does
``...tool...``     if the request has ``tools`` (and tool_choice is not "none"): a call to the first tool
                   (or the one tool_choice names), arguments built from its JSON schema properties
                   (string "mock", number 1, boolean true, ...); finish_reason ``tool_calls`` /
                   stop_reason ``tool_use``
=================  ======================================================================================

Token counts (deterministic): prompt = whitespace-separated words across all message contents (strings or
``text`` parts) plus the top-level ``system`` (Anthropic); completion = words of the reply (for a tool call:
words of the JSON arguments) + reasoning tokens; total = prompt + completion. Anthropic reports
``input_tokens = prompt - cached`` and ``cache_read_input_tokens = cached`` (LiteLLM adds them back up).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

import mock_embeddings

_NUMERIC = ("err", "ra", "slow", "drip", "cut", "cached", "reasoning", "words")
_OPENAI_ERRORS = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
                  403: ("invalid_request_error", "unsupported_country_region_territory"),
                  404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded")}
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                     500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}
_SAMPLES = {"string": "mock", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}


@dataclass
class RecordedRequest:
    """One request as the mock received it (header names lower-cased; body None unless a JSON object)."""

    path: str
    headers: dict[str, str]
    body: dict | None
    received_at: float


@dataclass
class Behaviour:
    """What the model name asks for (see the module docstring)."""

    err: int | None = None
    ra: int | None = None
    slow: int = 0
    drip: int = 0
    cut: int | None = None
    cached: int = 0
    reasoning: int = 0
    words: int | None = None
    malformed: bool = False
    tool: bool = False
    ctx: bool = False
    policy: bool = False
    cookie: bool = False

    @classmethod
    def parse(cls, model: str) -> Behaviour:
        tokens = model.split("-")
        behaviour = cls(malformed="malformed" in tokens, tool="tool" in model, ctx="ctx" in tokens,
                        policy="policy" in tokens, cookie="cookie" in tokens)
        for name, value in itertools.pairwise(tokens):
            if name in _NUMERIC and value.isdigit():
                setattr(behaviour, name, int(value))
        return behaviour


@dataclass
class Reply:
    """The deterministic answer to one request."""

    text: str
    tool: dict[str, str] | None  # {"id", "name", "arguments"}
    prompt: int
    completion: int
    cached: int
    reasoning: int


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


def _pick_tool(body: dict) -> tuple[str, dict] | None:
    """(name, JSON schema) of the tool to call: the one tool_choice names, else the first."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if not tools or choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    specs = [(t["function"].get("name", ""), t["function"].get("parameters") or {}) if "function" in t
             else (t.get("name", ""), t.get("input_schema") or {}) for t in tools]
    choice = choice if isinstance(choice, dict) else {}
    wanted = choice.get("name") or (choice.get("function") or {}).get("name")
    return next((s for s in specs if s[0] == wanted), specs[0])


def plan_reply(body: dict, behaviour: Behaviour) -> Reply:
    """Compute the reply text or tool call and the token counts for a request body (either provider)."""
    model = str(body.get("model", ""))
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    texts = [_text(m.get("content")) for m in messages] + [_text(body.get("system"))]
    prompt = sum(len(t.split()) for t in texts)
    tool = _pick_tool(body) if behaviour.tool else None
    if tool is not None:
        props = tool[1].get("properties") or {}
        arguments = json.dumps({k: _SAMPLES.get(isinstance(v, dict) and v.get("type"), "mock")
                                for k, v in props.items()})
        call = {"id": uuid.uuid4().hex[:24], "name": tool[0], "arguments": arguments}
        text, words = "", len(arguments.split())
    else:
        if behaviour.words is not None:
            text = " ".join(f"w{i}" for i in range(1, behaviour.words + 1))
        else:
            users = [m for m in messages if m.get("role") == "user"]
            echo = " ".join(_text(users[-1].get("content")).split()[:20]) if users else ""
            text = f"Hello from {model}: {echo}".rstrip()
        call, words = None, len(text.split())
    reasoning = behaviour.reasoning
    return Reply(text, call, prompt, words + reasoning, min(behaviour.cached, prompt), reasoning)


def _pieces(text: str) -> list[str]:
    """One word per piece, with its leading spaces, so that ''.join(pieces) == text (no trailing spaces)."""
    return re.findall(r"\s*\S+", text)


def _sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


# --- OpenAI wire format ---------------------------------------------------------------------------------

def openai_error(status: int, message: str, code: str | None = "") -> dict:
    fallback = ("server_error" if status >= 500 else "invalid_request_error", None)
    kind, default = _OPENAI_ERRORS.get(status, fallback)
    code = default if code == "" else code
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _openai_usage(r: Reply) -> dict:
    return {"prompt_tokens": r.prompt, "completion_tokens": r.completion,
            "total_tokens": r.prompt + r.completion,
            "prompt_tokens_details": {"cached_tokens": r.cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": r.reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def _openai_call(tool: dict[str, str], arguments: str) -> dict:
    function = {"name": tool["name"], "arguments": arguments}
    return {"id": "call_" + tool["id"], "type": "function", "function": function}


def openai_json(model: str, r: Reply) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": r.text if r.tool is None else None,
                               "refusal": None, "annotations": []}
    if r.tool is not None:
        message["tool_calls"] = [_openai_call(r.tool, r.tool["arguments"])]
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                         "finish_reason": "stop" if r.tool is None else "tool_calls"}],
            "usage": _openai_usage(r), "service_tier": "default", "system_fingerprint": "fp_mock"}


def openai_stream(model: str, r: Reply, body: dict) -> tuple[list[str], list[str], list[str]]:
    """(preamble, content, tail) SSE events of a chat.completion.chunk stream."""
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model, "system_fingerprint": "fp_mock"}

    def chunk(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **({"usage": None} if include_usage else {})})

    if r.tool is None:
        preamble = [chunk({"role": "assistant", "content": "", "refusal": None})]
        content = [chunk({"content": p}) for p in _pieces(r.text)]
    else:
        preamble = [chunk({"role": "assistant", "content": None, "refusal": None}),
                    chunk({"tool_calls": [{"index": 0, **_openai_call(r.tool, "")}]})]
        content = [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
                   for p in _pieces(r.tool["arguments"])]
    tail = [chunk({}, "stop" if r.tool is None else "tool_calls")]
    if include_usage:
        tail.append(_sse({**base, "choices": [], "usage": _openai_usage(r)}))
    return preamble, content, [*tail, _sse("[DONE]")]


# --- Anthropic wire format ------------------------------------------------------------------------------

def anthropic_error(status: int, message: str) -> dict:
    kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _anthropic_usage(r: Reply, output: int) -> dict:
    return {"input_tokens": r.prompt - r.cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": r.cached, "output_tokens": output, "service_tier": "standard"}


def anthropic_json(model: str, r: Reply) -> dict:
    if r.tool is None:
        block: dict[str, Any] = {"type": "text", "text": r.text}
    else:
        block = {"type": "tool_use", "id": "toolu_" + r.tool["id"], "name": r.tool["name"],
                 "input": json.loads(r.tool["arguments"])}
    return {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "model": model,
            "content": [block], "stop_reason": "end_turn" if r.tool is None else "tool_use",
            "stop_sequence": None, "usage": _anthropic_usage(r, r.completion)}


def anthropic_stream(model: str, r: Reply) -> tuple[list[str], list[str], list[str]]:
    """(preamble, content, tail) SSE events of a Messages stream."""
    start = {**anthropic_json(model, r), "content": [], "stop_reason": None, "usage": _anthropic_usage(r, 1)}
    if r.tool is None:
        block: dict[str, Any] = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in _pieces(r.text)]
    else:
        block = {"type": "tool_use", "id": "toolu_" + r.tool["id"], "name": r.tool["name"], "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in _pieces(r.tool["arguments"])]
    stop = {"stop_reason": "end_turn" if r.tool is None else "tool_use", "stop_sequence": None}

    def events(*items: tuple[str, dict]) -> list[str]:
        return [_sse({"type": name, **data}, name) for name, data in items]

    return (events(("message_start", {"message": start}),
                   ("content_block_start", {"index": 0, "content_block": block}), ("ping", {})),
            events(*(("content_block_delta", {"index": 0, "delta": d}) for d in deltas)),
            events(("content_block_stop", {"index": 0}),
                   ("message_delta", {"delta": stop, "usage": {"output_tokens": r.completion}}),
                   ("message_stop", {})))


# --- the server -----------------------------------------------------------------------------------------

class MockProvider:
    """OpenAI and Anthropic look-alikes on one local port; see the module docstring."""

    def __init__(self, required_key: str | None = None) -> None:
        self.required_key = required_key
        self.requests: list[RecordedRequest] = []
        self.active_streams = 0
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base(self) -> str:
        return self.base_url + "/v1"

    @property
    def anthropic_base(self) -> str:
        return self.base_url

    def start(self) -> MockProvider:
        """Bind 127.0.0.1 on a free port; return once listening."""
        ready, failure = threading.Event(), []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="mock-provider", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure or not self.port:
            raise RuntimeError(f"mock provider did not start: {failure}")
        return self

    def stop(self) -> None:
        """Close the listener and any open connections, and end the thread."""
        loop, runner = self._loop, self._runner
        if loop is None or runner is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(runner), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = self._runner = self._thread = None

    def __enter__(self) -> MockProvider:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.requests.clear()

    def requests_for(self, model_substring: str) -> list[RecordedRequest]:
        """The recorded requests whose body's model contains model_substring."""
        with self._lock:
            return [r for r in self.requests if r.body and model_substring in str(r.body.get("model", ""))]

    def requests_with(self, marker: str) -> list[RecordedRequest]:
        """The recorded requests whose JSON body contains ``marker`` anywhere (e.g. in a message)."""
        with self._lock:
            return [r for r in self.requests if r.body and marker in json.dumps(r.body)]

    async def _serve(self) -> None:
        import mock_completions  # OpenAI's legacy text completions (its own module: it imports this one)

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        mock_embeddings.add_routes(app, self)  # /v1/embeddings (OpenAI), /v2/embed (Cohere)
        app.router.add_post("/v1/completions", mock_completions.handler(self))
        import mock_responses  # OpenAI /v1/responses (it imports this module, hence not at the top)
        app.router.add_post("/v1/responses", functools.partial(mock_responses.answer, self))
        import mock_anthropic_extras  # imports this module: count_tokens, thinking, cache writes for /v1/messages
        mock_anthropic_extras.register(app, self)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    @staticmethod
    async def _shutdown(runner: web.AppRunner) -> None:
        await runner.cleanup()  # waits up to shutdown_timeout for open responses, then cancels handlers
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _record(self, request: web.Request) -> dict | None:
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else None
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            self.requests.append(RecordedRequest(request.path, headers, body, time.time()))
        return body

    async def _unknown(self, request: web.Request) -> web.Response:
        await self._record(request)
        message = f"Unknown request URL: {request.method} {request.path}"
        return web.json_response(openai_error(404, message, None), status=404)

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        key_ok = request.headers.get("Authorization") == f"Bearer {self.required_key}"
        return await self._answer(request, body, key_ok, "openai")

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        key_ok = request.headers.get("x-api-key") == self.required_key
        return await self._answer(request, body, key_ok, "anthropic")

    @staticmethod
    def _refusal(provider: str, context_window: bool) -> dict:
        """The 400s that have fallbacks of their own, worded as each provider words them."""
        if provider == "anthropic":
            message = ("prompt is too long: 250000 tokens > 200000 maximum" if context_window
                       else "Output blocked by content filtering policy")
            return anthropic_error(400, message)
        if context_window:
            return openai_error(400, "This model's maximum context length is 8192 tokens. However, your messages "
                                     "resulted in 250000 tokens.", "context_length_exceeded")
        return openai_error(400, "Your request was rejected as a result of our safety system.",
                            "content_policy_violation")

    async def _answer(self, request: web.Request, body: dict | None, key_ok: bool,
                      provider: str) -> web.StreamResponse:
        error = openai_error if provider == "openai" else anthropic_error
        headers = {"x-request-id" if provider == "openai" else "request-id": "req_" + uuid.uuid4().hex}
        if self.required_key is not None and not key_ok:
            message = "Incorrect API key provided." if provider == "openai" else "invalid x-api-key"
            return web.json_response(error(401, message), status=401, headers=headers)
        if body is None or not isinstance(body.get("model"), str):
            return web.json_response(error(400, "The request body is not a JSON object with a model."),
                                     status=400, headers=headers)
        model, behaviour = body["model"], Behaviour.parse(body["model"])
        if behaviour.cookie:
            headers["Set-Cookie"] = f"mock_session={uuid.uuid4().hex}; Path=/"
        await asyncio.sleep(behaviour.slow / 1000)
        if behaviour.err is not None:
            if behaviour.ra is not None:
                headers["Retry-After"] = str(behaviour.ra)
            message = f"Mock error {behaviour.err} for model {model}."
            return web.json_response(error(behaviour.err, message), status=behaviour.err, headers=headers)
        if behaviour.ctx or behaviour.policy:
            return web.json_response(self._refusal(provider, behaviour.ctx), status=400, headers=headers)
        reply = plan_reply(body, behaviour)
        if not body.get("stream"):
            if behaviour.cut is not None:
                return self._cut(request, web.Response(status=200))
            if behaviour.malformed:
                return web.Response(text='{"id": "oops", not json', content_type="application/json",
                                    headers=headers)
            payload = openai_json(model, reply) if provider == "openai" else anthropic_json(model, reply)
            return web.json_response(payload, headers=headers)
        preamble, content, tail = (openai_stream(model, reply, body) if provider == "openai"
                                   else anthropic_stream(model, reply))
        if behaviour.malformed:
            preamble.insert(0, _sse('{"type": "oops", not json', None))
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        cut = behaviour.cut
        events = preamble + content + tail if cut is None else preamble + content[:cut] if cut else []
        self.active_streams += 1
        try:
            await resp.prepare(request)
            for i, event in enumerate(events):
                if i and behaviour.drip:
                    await asyncio.sleep(behaviour.drip / 1000)
                await resp.write(event.encode())
            if cut is not None:
                return self._cut(request, resp)
            await resp.write_eof()
        except ConnectionError:  # the client went away
            pass
        finally:
            self.active_streams -= 1
        return resp

    @staticmethod
    def _cut(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """Close the connection mid-response: what was written is flushed, then FIN, no end of body."""
        if request.transport is not None:
            request.transport.close()
        return resp
