"""Kong's side of an external plugin, for tests: no Kong binary here, so this plays a Kong 3.9 node.

Small on purpose, and faithful where the plugin server can tell the difference. Each behaviour cites the Kong
3.9.1 source it copies:

* ``KongRPC``: ``kong/runloop/plugin_servers/rpc/mp_rpc.lua`` ``Rpc:call`` — MessagePack-RPC requests
  ``[0, id, method, [params]]``, notifications ``[2, label, args]`` read in between, response
  ``[1, id, err, result]``; connections pooled and reused (cosocket keepalive), one checked out per call.
* ``KongHarness``: an HTTP server playing a Route as ``kong.yml`` sets it up: its ``pre-function`` (a bearer
  token becomes ``apikey``, Authorization is removed), key-auth (``kong/plugins/key-auth/handler.lua``, key
  names ``apikey`` and ``x-api-key``, credentials hidden) with Kong's ``error_template_json`` (the image's
  ``docker/kong-error-template.json``), then our plugin's access phase (``plugin.lua`` ``get_instance_id``,
  ``mp_rpc.lua`` ``bridge_loop`` and ``handle_event``), then a proxy to the Service that streams the upstream
  response back unbuffered.
* The PDK methods our plugin may call, with ``kong/pdk/*.lua`` semantics, errors dropped as in 3.9.1's
  ``call_pdk_method`` (only the first return value travels).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DIR = ROOT / "kong-plugins"
ERROR_TEMPLATE = (ROOT / "docker" / "kong-error-template.json").read_text().strip()
KEY_NAMES = ("apikey", "x-api-key")  # kong.yml's key-auth key_names, in order
BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)  # kong.yml's pre-function pattern
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length", "host"}
CONSUMER_HEADERS = ("x-consumer-id", "x-consumer-custom-id", "x-consumer-username", "x-credential-identifier",
                    "x-anonymous-consumer")
STEP_BY_METHOD = {  # mp_rpc.lua get_step_method
    "kong.client.get_credential": "plugin.StepCredential",
    "kong.client.load_consumer": "plugin.StepConsumer",
    "kong.client.get_consumer": "plugin.StepConsumer",
    "kong.client.authenticate": "plugin.StepCredential",
    "kong.node.get_memory_stats": "plugin.StepMemoryStats",
    "kong.router.get_route": "plugin.StepRoute",
    "kong.router.get_service": "plugin.StepService",
    "kong.request.get_query": "plugin.StepMultiMap",
    "kong.request.get_headers": "plugin.StepMultiMap",
    "kong.response.get_headers": "plugin.StepMultiMap",
    "kong.service.response.get_headers": "plugin.StepMultiMap",
}


RAW_RESULTS = {"kong.request.get_raw_body", "kong.response.get_raw_body", "kong.service.response.get_raw_body"}


class LuaError(Exception):
    """What would be a Lua error in Kong's access phase: the request ends with a 500."""


class RPCError(Exception):
    """An error answered by the plugin server, or "no data" when the connection failed (as mp_rpc.lua)."""


# -- the plugin server process ---------------------------------------------------------------------------
@dataclass
class PluginServerProcess:
    proc: subprocess.Popen
    socket_path: str
    listen: str
    demo_listen: str
    stderr_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        return Path(self.stderr_path).read_text(errors="replace")

    def log_lines(self) -> list[str]:
        """The server's log lines written so far, whole: a line it is still writing is left for the next read."""
        text = self.stderr_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()
        return lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _plugin_env(env: dict[str, str] | None) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(PLUGINS_DIR), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **(env or {})}


def start_plugin_server(socket_path: str, listen: str, demo_listen: str, env: dict[str, str] | None = None,
                        python: str = sys.executable, timeout: float = 60) -> PluginServerProcess:
    """Start the server as Kong's process.lua does (its start_cmd), and wait until the socket accepts."""
    stderr_path = tempfile.mktemp(prefix="plugin-server-", suffix=".log")
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [python, "-m", "llm_gateway", "serve", "--socket", socket_path, "--listen", listen,
             "--demo-listen", demo_listen], env=_plugin_env(env), stdin=subprocess.DEVNULL, stdout=stderr,
            stderr=stderr)
    server = PluginServerProcess(proc, socket_path, listen, demo_listen, stderr_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"plugin server exited {proc.returncode}:\n{server.stderr_text()}")
        try:
            # the socket is bound at once, and the first call is answered when the server is ready
            KongRPC(socket_path, timeout=max(1.0, deadline - time.monotonic())).call("plugin.GetStatus")
            return server
        except RPCError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"plugin server never answered:\n{server.stderr_text()}") from None
            time.sleep(0.05)


def query_plugin_info(python: str = sys.executable) -> tuple[list[dict[str, Any]], str]:
    """Run the query_cmd as process.lua does (io.popen, read all of stdout, cjson.decode)."""
    raw = subprocess.run([python, "-m", "llm_gateway", "dump"], env=_plugin_env(None), capture_output=True,
                         text=True, check=True).stdout
    return json.loads(raw), raw


# -- MessagePack-RPC ---------------------------------------------------------------------------------------
class KongRPC:
    """mp_rpc.lua's Rpc:call with a keepalive pool; thread-safe, blocking (the harness runs it in threads)."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._idle: list[tuple[socket.socket, msgpack.Unpacker]] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.server_pid: int | None = None
        self.on_server_restart: list[Callable[[], None]] = []

    def _checkout(self) -> tuple[socket.socket, msgpack.Unpacker]:
        with self._lock:
            if self._idle:
                return self._idle.pop()  # LIFO, like the cosocket pool
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise RPCError(f"trying to connect: {exc}") from None
        return sock, msgpack.Unpacker(raw=False, strict_map_key=False)

    def _notification(self, label: str, arg: Any) -> None:
        """plugin.lua rpc_notifications:serverPid — a new pid invalidates every cached instance."""
        if label == "serverPid":
            if self.server_pid is not None and arg != self.server_pid:
                for callback in self.on_server_restart:
                    callback()
            self.server_pid = arg

    def call(self, method: str, *params: Any) -> Any:
        sock, unpacker = self._checkout()
        msg_id = next(self._ids)
        try:
            sock.sendall(msgpack.packb([0, msg_id, method, list(params)], use_bin_type=True))
            while True:
                for message in unpacker:
                    if message[0] == 2:
                        self._notification(message[1], message[2])
                        continue
                    assert message[0] == 1 and message[1] == msg_id, f"unexpected RPC message {message!r}"
                    with self._lock:
                        self._idle.append((sock, unpacker))
                    if message[2] is not None:
                        raise RPCError(message[2])
                    return message[3]
                data = sock.recv(65536)
                if not data:
                    raise OSError("closed")
                unpacker.feed(data)
        except OSError:
            sock.close()
            raise RPCError("no data") from None


# -- the Kong node -----------------------------------------------------------------------------------------
@dataclass
class RequestCtx:
    """One proxied request as the PDK sees it. ``headers`` are nginx's request headers, which
    ``kong.service.request.set_header`` modifies in place (ngx.req.set_header), so they are also what the
    Service receives."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    consumer: dict[str, Any] | None
    credential: dict[str, Any] | None
    target: tuple[str, int] | None = None
    exit: tuple[int, Any, dict[str, str]] | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    serialize: dict[str, Any] = field(default_factory=dict)


class KongHarness:
    """A Route with key-auth and our external plugin in front of a Service, on 127.0.0.1."""

    def __init__(self, socket_path: str, plugin_config: dict[str, Any], consumers: dict[str, dict[str, Any]],
                 service_url: str = "http://127.0.0.1:8787", plugin_name: str = "llm-gateway", workers: int = 2,
                 client_body_buffer_size: int = 8192, rpc_timeout: float = 60.0,
                 read_timeout_ms: int = 60000) -> None:
        self.plugin_config = plugin_config
        self.consumers = consumers
        self.service_url = service_url.rstrip("/")
        self.plugin_name = plugin_name
        self.client_body_buffer_size = client_body_buffer_size
        self.read_timeout_ms = read_timeout_ms  # the Service's read_timeout (Kong's default: 60 s)
        self.rpc = KongRPC(socket_path, rpc_timeout)
        self.rpc.on_server_restart.append(self._reset_instances)
        self.plugin_id = str(uuid.uuid4())
        self.route_id, self.service_id = str(uuid.uuid4()), str(uuid.uuid4())
        self.seq = 1
        self._workers: list[dict[str, tuple[int, int]]] = [{} for _ in range(workers)]
        self._next_worker = itertools.count()
        self.traces: list[list[str]] = []
        self.kong_log: list[str] = []
        self.url = ""
        self._threads = ThreadPoolExecutor(128, thread_name_prefix="kong-worker")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def last_trace(self) -> list[str]:
        return self.traces[-1] if self.traces else []

    def set_config(self, config: dict[str, Any]) -> None:
        """A config change: Kong bumps __seq__, and each worker starts a new instance on its next request."""
        self.plugin_config = config
        self.seq += 1

    # -- instances (plugin.lua get_instance_id / reset_instance) ----------------------------------------
    def _reset_instances(self) -> None:
        for cache in self._workers:
            cache.clear()

    def _instance_id(self, cache: dict[str, tuple[int, int]], trace: list[str]) -> int:
        cached = cache.get(self.plugin_id)
        if cached and cached[1] == self.seq:
            return cached[0]
        # as plugins_iterator.get_plugin_config: the plugin's scope and Kong's markers join the user's config
        conf = dict(self.plugin_config, route_id=self.route_id, service_id=self.service_id,
                    __plugin_id=self.plugin_id, __seq__=self.seq, __key__=self.plugin_id)
        trace.append("plugin.StartInstance")
        status = self.rpc.call("plugin.StartInstance", {"Name": self.plugin_name, "Config": json.dumps(conf)})
        cache[self.plugin_id] = (status["Id"], self.seq)
        if cached:
            trace.append("plugin.CloseInstance")
            try:
                self.rpc.call("plugin.CloseInstance", cached[0])
            except RPCError:
                pass  # maybe another worker closed it first
        return status["Id"]

    def _access(self, ctx: RequestCtx, trace: list[str]) -> None:
        """Rpc:handle_event for the access phase: a "no plugin instance" error restarts it and retries."""
        cache = self._workers[next(self._next_worker) % len(self._workers)]
        for attempt in (1, 2):
            try:
                self._bridge(self._instance_id(cache, trace), ctx, trace)
                return
            except RPCError as exc:
                if "no plugin instance" in str(exc).lower() and attempt == 1:
                    self.kong_log.append(f"[warn] {exc}")
                    self._reset_instances()
                    continue
                self.kong_log.append(f"[error] {exc}")  # Kong logs it and proxies anyway: fail-open
                return

    def _bridge(self, instance_id: int, ctx: RequestCtx, trace: list[str]) -> None:
        """mp_rpc.lua bridge_loop."""
        trace.append("plugin.HandleEvent")
        step = self.rpc.call("plugin.HandleEvent", {"InstanceId": instance_id, "EventName": "access"})
        while step["Data"] != "ret":
            method, args = step["Data"]["Method"], step["Data"].get("Args") or []
            result = self._pdk(ctx, method, args)
            if ctx.exit is not None:
                return  # kong.response.exit ends the request: no further step
            if result is None and method in RAW_RESULTS:
                # mp_rpc.lua must_fix: fix_raw(nil) fails while packing the Step, a Lua error: Kong answers 500
                raise LuaError(f"{method} returned nil: cannot pack the step")
            step_method = STEP_BY_METHOD.get(method, "plugin.Step")
            trace.append(step_method)
            step = self.rpc.call(step_method, {"EventId": step["EventId"], "Data": result})

    # -- the PDK (kong/pdk/*.lua) -------------------------------------------------------------------------
    def _pdk(self, ctx: RequestCtx, method: str, args: list[Any]) -> Any:
        def raw_body(max_size: int | None = None) -> bytes | None:
            if len(ctx.body) <= self.client_body_buffer_size:
                return ctx.body
            # request.lua get_raw_body: the body was spooled to a file
            if max_size is None or max_size < 0 or (max_size > 0 and len(ctx.body) > max_size):
                return None
            return ctx.body

        def set_header(name: str, value: Any) -> None:
            ctx.headers[name.lower()] = str(value)

        def exit_(status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
            ctx.exit = (status, body, headers or {})

        handlers: dict[str, Callable[..., Any]] = {
            "kong.request.get_raw_body": raw_body,
            "kong.request.get_header": lambda name: ctx.headers.get(name.lower()),
            "kong.request.get_headers": lambda max_headers=None: {k: [v] for k, v in ctx.headers.items()},
            "kong.request.get_method": lambda: ctx.method,
            "kong.request.get_path": lambda: ctx.path,
            "kong.request.get_query": lambda max_args=None: {k: [v] for k, v in ctx.query.items()},
            "kong.client.get_consumer": lambda: ctx.consumer,
            "kong.client.get_credential": lambda: ctx.credential,
            "kong.router.get_service": lambda: {"id": self.service_id, "protocol": "http", "retries": 0,
                                                "connect_timeout": 60000, "write_timeout": 60000,
                                                "read_timeout": self.read_timeout_ms},
            "kong.service.request.set_header": set_header,
            "kong.service.request.clear_header": lambda name: ctx.headers.pop(name.lower(), None) and None,
            "kong.service.request.set_path": lambda path: setattr(ctx, "path", path),
            "kong.service.set_target": lambda host, port: setattr(ctx, "target", (host, int(port))),
            "kong.response.set_header": lambda name, value: ctx.response_headers.__setitem__(name, str(value)),
            "kong.response.exit": exit_,
            "kong.ctx.shared.get": lambda key: ctx.shared.get(key),
            "kong.ctx.shared.set": lambda key, value: ctx.shared.__setitem__(key, value),
            "kong.nginx.get_var": lambda name: {"request_method": ctx.method, "uri": ctx.path}.get(name),
            "kong.log.set_serialize_value": lambda key, value: ctx.serialize.__setitem__(key, value),
        }
        if method.startswith("kong.log.") and method not in handlers:
            self.kong_log.append(f"[{method[9:]}] " + " ".join(map(str, args)))
            return None
        handler = handlers.get(method)
        if handler is None:
            self.kong_log.append(f"[error] could not find pdk method: {method}")
            return None
        return handler(*args)

    # -- HTTP: key-auth, the plugin, the proxy ------------------------------------------------------------
    @staticmethod
    def kong_error(status: int, message: str, request_id: str | dict[str, str],
                   headers: dict[str, str] | None = None) -> web.Response:
        """kong.response.error: Kong's error_template_json filled with the message, then the request id."""
        rid = request_id if isinstance(request_id, str) else request_id["X-Kong-Request-Id"]
        return web.Response(status=status, text=ERROR_TEMPLATE % (message, rid), content_type="application/json",
                            headers={"X-Kong-Request-Id": rid, **(headers or {})})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        request_id = uuid.uuid4().hex
        ids = {"X-Kong-Request-Id": request_id}
        # kong.yml's pre-function: a bearer token is key-auth's apikey unless one was sent; the header goes
        incoming = {k.lower(): v for k, v in request.headers.items()}
        bearer = BEARER.match(incoming.get("authorization", ""))
        if bearer:
            incoming.setdefault("apikey", bearer.group(1))
            del incoming["authorization"]
        if "apikey" in incoming:
            incoming.pop("x-api-key", None)
        # key-auth: the first key name present (or the query string), hidden from the upstream once found
        name = next((n for n in KEY_NAMES if incoming.get(n)), None)
        key = incoming.pop(name) if name else request.query.get("apikey")
        if not key:
            return self.kong_error(401, "No API key found in request", request_id,
                                   {"WWW-Authenticate": 'Key realm="kong"'})
        consumer = self.consumers.get(key)
        if consumer is None:
            return self.kong_error(401, "Unauthorized", request_id, {"WWW-Authenticate": 'Key realm="kong"'})
        credential = {"id": str(uuid.uuid5(uuid.NAMESPACE_OID, key)), "consumer": {"id": consumer["id"]},
                      "key": key}
        headers = {k: v for k, v in incoming.items() if k not in HOP_BY_HOP and k not in CONSUMER_HEADERS}
        headers.update({"x-consumer-id": consumer["id"], "x-consumer-username": consumer.get("username") or "",
                        "x-credential-identifier": credential["id"], "x-kong-request-id": request_id})
        if consumer.get("custom_id"):
            headers["x-consumer-custom-id"] = consumer["custom_id"]
        ctx = RequestCtx(request.method, request.path, dict(request.query), headers, await request.read(),
                         consumer, credential)
        trace: list[str] = []
        try:
            await asyncio.get_running_loop().run_in_executor(self._threads, self._access, ctx, trace)
        except LuaError as exc:
            self.kong_log.append(f"[error] {exc}")
            return self.kong_error(500, "An unexpected error occurred", request_id)
        finally:
            self.traces.append(trace)
        if ctx.exit is not None:
            status, body, exit_headers = ctx.exit
            text = body if isinstance(body, str | bytes) or body is None else json.dumps(body)
            return web.Response(status=status, body=text, headers={**exit_headers, **ctx.response_headers, **ids})
        return await self._proxy(request, ctx, ids)

    async def _proxy(self, request: web.Request, ctx: RequestCtx, ids: dict[str, str]) -> web.StreamResponse:
        base = f"http://{ctx.target[0]}:{ctx.target[1]}" if ctx.target else self.service_url
        query = ("?" + request.query_string) if request.query_string else ""
        try:
            upstream = await self._session.request(
                ctx.method, f"{base}{ctx.path}{query}", data=ctx.body, headers=ctx.headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self.read_timeout_ms / 1000))
        except TimeoutError:  # before ClientError: aiohttp's read timeout is both
            return self.kong_error(504, "The upstream server is timing out", ids)
        except aiohttp.ClientError:
            return self.kong_error(502, "An invalid response was received from the upstream server", ids)
        async with upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                **{k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
                **ctx.response_headers, **ids, "Via": "1.1 kong/3.9.1"})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():  # unbuffered, as with response_buffering off
                await response.write(chunk)
            await response.write_eof()
            return response

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> KongHarness:
        ready = threading.Event()

        async def serve() -> None:
            self._session = aiohttp.ClientSession(auto_decompress=False,
                                                  timeout=aiohttp.ClientTimeout(total=None, sock_read=60))
            app = web.Application(client_max_size=256 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            # auto_decompress off: Kong hands the plugin (get_raw_body) and the Service the body as the client sent it
            self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="kong-harness")
        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop)
        if not ready.wait(10):
            raise RuntimeError("the Kong harness did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)  # type: ignore[union-attr]
        self._threads.shutdown(wait=False)
        self._loop = None

    def __enter__(self) -> KongHarness:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
