"""Kong's side of an external plugin, served with asyncio: MessagePack-RPC over a Unix socket.

This replaces kong-pdk's stock server, whose defects are measured in the research notes (a global lock held
until a handler's first PDK call, uncaught handler exceptions that wedge the server, async handlers never
awaited, one leaked event per ``kong.response.exit``). The wire protocol is Kong 3.9's
``kong/runloop/plugin_servers/rpc/mp_rpc.lua`` and ``plugin.lua``:

* request ``[0, id, method, [params]]`` → response ``[1, id, error, result]``; notifications ``[2, label, arg]``.
* ``plugin.StartInstance {Name, Config: <json>}`` → ``{Id, Config, ...}``; ``plugin.CloseInstance id``.
* ``plugin.HandleEvent {InstanceId, EventName}`` → ``{EventId, Data}`` where Data is ``"ret"`` (done) or a PDK
  call ``{Method, Args}``; Kong runs it and answers with ``plugin.Step*{EventId, Data}``, and so on.
* Kong checks a pooled connection out per RPC, so one event's steps may arrive on different connections:
  event state is keyed by EventId, never by connection.
* ``kong.response.exit`` ends the request in Kong: no Step follows, so the event is freed when it is sent.
* Kong retries an event after an error containing "no plugin instance", restarting the instance; after a
  restart it learns our new pid from the ``serverPid`` notification and drops its cached instance ids.

Handlers are coroutines ``async def access(self, kong)``; a PDK call is ``await kong.request.get_header(x)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from llm_gateway.errors import internal_error
from llm_gateway.kong import handover

log = logging.getLogger("llm_gateway.rpc")

RET = "ret"
TERMINAL_METHODS = frozenset({"kong.response.exit", "kong.response.error"})
STEP_METHODS = frozenset({
    "Step", "StepError", "StepCredential", "StepConsumer", "StepMemoryStats", "StepRoute", "StepService",
    "StepMultiMap",
})


class RPCError(Exception):
    """Sent back to Kong as the error element of the response."""


class Handler(Protocol):
    """A plugin instance: one coroutine per phase it implements, plus ``close``."""

    def close(self) -> None: ...


HandlerFactory = Callable[[dict[str, Any]], Handler]
#: awaited after an instance starts (its id, the config) and after it closes (its id): the worker processes
#: (kong/workers.py) hold every instance before Kong hears of it
InstanceHook = Callable[..., Awaitable[None]]


class PDK:
    """``kong.x.y(...)`` as awaitable calls that travel to Kong and back through the event's steps."""

    __slots__ = ("_event", "_path")

    def __init__(self, event: Event, path: str = "kong") -> None:
        self._event = event
        self._path = path

    def __getattr__(self, name: str) -> PDK:
        return PDK(self._event, f"{self._path}.{name}")

    def __call__(self, *args: Any) -> Awaitable[Any]:
        return self._event.call(self._path, args)


@dataclass(eq=False)
class Event:
    """One phase run of one request: the handler task and the hand-over points with Kong's steps."""

    id: int
    created: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None
    # what the next HandleEvent/Step response carries to Kong: a PDK call or "ret"
    outgoing: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # the answer to the PDK call in flight, delivered by Kong's next Step
    incoming: asyncio.Future | None = None

    async def call(self, method: str, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        self.incoming = loop.create_future()
        self.outgoing.set_result({"Method": method, "Args": list(args)})
        if method in TERMINAL_METHODS:
            return None  # Kong ends the request; no Step will answer
        return await self.incoming


@dataclass
class Instance:
    id: int
    name: str
    config: dict[str, Any]
    handler: Handler
    started: float = field(default_factory=time.time)


class PluginServer:
    """Instances, events and the RPC methods Kong calls."""

    def __init__(self, name: str, factory: HandlerFactory, *, event_timeout: float = 55.0,
                 on_start: InstanceHook | None = None, on_close: InstanceHook | None = None,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.name = name
        self.factory = factory
        self.on_start = on_start
        self.on_close = on_close
        self.status = status  # more of GetStatus (the processes)
        self.event_timeout = event_timeout  # below OpenResty's 60 s socket timeout, so we answer first
        self.instances: dict[int, Instance] = {}
        self.events: dict[int, Event] = {}
        # ids from a per-process random start: a Kong worker holding an id from before a restart gets
        # "no plugin instance" instead of silently reaching another config's instance
        # (kept under 2**31: Kong's LuaJIT numbers and lua-MessagePack's integer packing stay exact)
        start = int.from_bytes(os.urandom(2), "big") * 10_000
        self._instance_ids = itertools.count(start)
        self._event_ids = itertools.count(start)

    # -- RPC methods -------------------------------------------------------------------------------------
    async def rpc_StartInstance(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("Name") != self.name:
            raise RPCError(f"{cfg.get('Name')} not initialized")
        config = json.loads(cfg["Config"])
        try:
            handler = self.factory(config)
        except ValueError as exc:  # ConfigError: a message naming the field, no secret
            raise RPCError(f"invalid {self.name} config: {exc}") from None
        iid = next(self._instance_ids)
        if self.on_start is not None:
            await self.on_start(iid, config)
        self.instances[iid] = Instance(iid, self.name, config, handler)
        log.info("instance %d started", iid)
        return {"Name": self.name, "Id": iid, "Config": config, "StartTime": time.time()}

    async def rpc_CloseInstance(self, iid: int) -> dict[str, Any]:
        instance = self.instances.pop(iid, None)
        if instance is None:
            raise RPCError(f"no plugin instance #{iid}")
        instance.handler.close()
        if self.on_close is not None:
            await self.on_close(iid)
        log.info("instance %d closed", iid)
        return {"Name": instance.name, "Id": iid, "Config": instance.config}

    async def rpc_GetStatus(self, *_: Any) -> dict[str, Any]:
        # GcFrozen: objects out of the collector's reach (cli._freeze_the_heap); not part of Kong's protocol
        # Processes: the master and its workers (kong/workers.py), when status is given
        return {"Pid": os.getpid(), "Events": len(self.events), "GcFrozen": gc.get_freeze_count(),
                **(self.status() if self.status is not None else {}),
                "Plugins": {self.name: {
            "Name": self.name, "Instances": [
                {"Name": i.name, "Id": i.id, "Config": i.config, "StartTime": i.started}
                for i in self.instances.values()
            ],
        }}}

    async def rpc_HandleEvent(self, req: dict[str, Any]) -> dict[str, Any]:
        iid = req["InstanceId"]
        instance = self.instances.get(iid)
        if instance is None:
            raise RPCError(f"no plugin instance #{iid}")  # Kong restarts the instance and retries
        phase = req["EventName"]
        method = getattr(instance.handler, phase, None)
        if method is None:
            return {"EventId": -1, "Data": RET}
        event = Event(next(self._event_ids))
        self.events[event.id] = event
        event.task = asyncio.create_task(self._run(event, method))
        return await self._next(event)

    async def rpc_Step(self, req: dict[str, Any], error: bool = False) -> dict[str, Any]:
        eid = req["EventId"]
        event = self.events.get(eid)
        if event is None or event.incoming is None or event.incoming.done():
            raise RPCError(f"event id {eid} not found")
        event.outgoing = asyncio.get_running_loop().create_future()
        # Kong 3.9 drops PDK errors (a failed call reaches us as nil); StepError carries one if it ever comes
        event.incoming.set_result(None if error else req.get("Data"))
        return await self._next(event)

    # -- event plumbing ----------------------------------------------------------------------------------
    async def _run(self, event: Event, method: Callable[[PDK], Awaitable[None]]) -> None:
        try:
            await method(PDK(event))
            result: Any = RET
        except asyncio.CancelledError:
            result = RET
        except Exception:
            # never a traceback to the client; the log has it (handlers never put secrets in exceptions)
            log.exception("plugin handler failed")
            err = internal_error()
            result = {"Method": "kong.response.exit",
                      "Args": [err.status, err.json(), {"Content-Type": "application/json"}]}
        if not event.outgoing.done():
            event.outgoing.set_result(result)

    async def _next(self, event: Event) -> dict[str, Any]:
        """Wait for the handler's next PDK call (or its end) and free the event when Kong will not step."""
        try:
            data = await asyncio.wait_for(asyncio.shield(event.outgoing), self.event_timeout)
        except TimeoutError:
            log.error("event %d: handler gave no answer in %.0f s", event.id, self.event_timeout)
            if event.task:
                event.task.cancel()
            err = internal_error()
            data = {"Method": "kong.response.exit",
                    "Args": [err.status, err.json(), {"Content-Type": "application/json"}]}
        if data == RET or (isinstance(data, dict) and data.get("Method") in TERMINAL_METHODS):
            self.events.pop(event.id, None)
        return {"EventId": event.id, "Data": data}

    def sweep(self) -> None:
        """Free events Kong abandoned mid-way (a dropped connection, a timed-out worker)."""
        deadline = time.monotonic() - 2 * self.event_timeout
        for eid, event in list(self.events.items()):
            if event.created < deadline:
                if event.task:
                    event.task.cancel()
                del self.events[eid]

    # -- transport ---------------------------------------------------------------------------------------
    async def dispatch(self, method: str, params: list[Any]) -> Any:
        ns, _, name = method.partition(".")
        if ns != "plugin":
            raise RPCError(f"RPC for {ns} is not supported")
        if name in STEP_METHODS:
            return await self.rpc_Step(params[0], error=name == "StepError")
        fn = getattr(self, f"rpc_{name}", None)
        if fn is None:
            raise RPCError(f"unknown method {method}")
        return await fn(*params)

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One Kong connection: requests arrive one at a time (Kong waits for each answer)."""
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        writer.write(msgpack.packb([2, "serverPid", os.getpid()]))
        try:
            while data := await reader.read(65536):
                unpacker.feed(data)
                for message in unpacker:
                    writer.write(await self._answer(message))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the server is stopping: an idle pooled connection is not an error worth a traceback
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, message: Any) -> bytes:
        try:
            kind, msgid, method, params = message
        except (TypeError, ValueError):
            return msgpack.packb([1, 0, "malformed request", None])
        if kind != 0:
            return msgpack.packb([1, msgid, "expected a request", None])
        try:
            result = await self.dispatch(method, params or [])
            return msgpack.packb([1, msgid, None, result], use_bin_type=True)
        except RPCError as exc:
            return msgpack.packb([1, msgid, str(exc), None])
        except Exception as exc:
            log.exception("rpc %s failed", method)
            return msgpack.packb([1, msgid, f"{method} failed: {type(exc).__name__}", None])

    async def serve(self, sock: socket.socket) -> asyncio.AbstractServer:
        """Accept Kong's connections on an already bound and listening Unix socket (see cli._bind_unix).

        asyncio listens again on a socket it is given, with its own backlog (100 by default): handover's is
        passed on, so that every nginx worker's pool of connections can wait while the loop is busy."""
        return await asyncio.start_unix_server(self.handle_connection, sock=sock, backlog=handover.BACKLOG)
