"""A provider that misbehaves the way issue 10 found real ones can: streams that never end (and ignore
``max_tokens``), and streams kept alive by SSE comments with no data. OpenAI's wire format, a real local HTTP
server on its own thread; every request body is kept in ``bodies``.

Models: ``endless`` (a content chunk of "word " every ``DRIP_S``, forever), ``comments`` (one content chunk,
then an SSE comment every 0.2 s, forever), ``slow-<ms>`` (a normal short stream after a pause).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from aiohttp import web

DRIP_S = 0.005


def _chunk(model: str, content: str) -> bytes:
    data = {"id": "chatcmpl-hostile", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class HostileProvider:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        await asyncio.Event().wait()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        model = body.get("model", "")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            if model == "endless":
                while True:
                    await response.write(_chunk(model, "word "))
                    await asyncio.sleep(DRIP_S)
            elif model == "comments":
                await response.write(_chunk(model, "hello"))
                while True:
                    await asyncio.sleep(0.2)
                    await response.write(b": still here\n\n")
            else:
                for word in ("one ", "two ", "three"):
                    await response.write(_chunk(model, word))
                await response.write(b"data: [DONE]\n\n")
        except (ConnectionError, asyncio.CancelledError):
            pass  # the gateway hung up: what a provider sees when its stream is ended
        return response

    def start(self) -> HostileProvider:
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve())

        threading.Thread(target=run, name="hostile-provider", daemon=True).start()
        self._ready.wait(10)
        return self
