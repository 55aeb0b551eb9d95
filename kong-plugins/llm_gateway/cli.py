"""``kong-llm-gateway dump`` (Kong's query_cmd) and ``kong-llm-gateway serve`` (Kong's start_cmd).

``dump`` must be fast and print only JSON: Kong runs it in every process that loads schemas and decodes the
whole of stdout. ``serve`` logs to stderr (Kong logs it at INFO). It binds Kong's socket and the listener's
port first, within milliseconds of being started, and accepts on them only once LiteLLM is imported and
warmed up: Kong's calls made meanwhile wait in the sockets' backlogs and are answered late rather than
refused (Kong would answer a refused connect() with a bare 500).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from llm_gateway import PLUGIN_NAME
from llm_gateway.kong import handover
from llm_gateway.kong.schema import plugin_info
from llm_gateway.operations import logs

log = logging.getLogger("llm_gateway")

DEFAULT_LISTEN = "127.0.0.1:8787"
DEFAULT_DEMO_LISTEN = "127.0.0.1:8788"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9542"
PR_SET_PDEATHSIG = 1


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kong-llm-gateway", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dump", help="print the plugin info Kong's pluginserver query_cmd expects")
    check = sub.add_parser("check", help="check the llm-gateway entries of declarative kong.yml files, without Kong")
    check.add_argument("files", nargs="+", help="declarative (decK) files, e.g. kong.yml")
    _add_ops_commands(sub)
    serve = sub.add_parser("serve", help="run the plugin server (Kong's pluginserver start_cmd)")
    env = os.environ.get
    serve.add_argument("--socket", default=env("LLM_GATEWAY_SOCKET"), required=not env("LLM_GATEWAY_SOCKET"),
                       help="Unix socket Kong connects to (pluginserver_<name>_socket)")
    serve.add_argument("--listen", type=_host_port, default=env("LLM_GATEWAY_LISTEN", DEFAULT_LISTEN),
                       help="loopback HOST:PORT Kong proxies LLM requests to (the Service URL)")
    serve.add_argument("--demo-listen", type=_host_port,
                       default=env("LLM_GATEWAY_DEMO_LISTEN", DEFAULT_DEMO_LISTEN),
                       help="loopback HOST:PORT of the built-in demo provider")
    serve.add_argument("--metrics-listen", default=env("LLM_GATEWAY_METRICS_LISTEN", DEFAULT_METRICS_LISTEN),
                       help="HOST:PORT serving Prometheus /metrics, or 'off'")
    serve.add_argument("--ticket-ttl", type=float, default=float(env("LLM_GATEWAY_TICKET_TTL", "30")),
                       help="seconds a hand-off ticket stays valid")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "dump":
        sys.stdout.write(json.dumps(plugin_info()))
        sys.stdout.flush()
        return 0
    if args.command == "check":
        return _check(args.files)
    if args.command in OPS_COMMANDS:
        return _run_ops_command(args)
    logs.configure()  # one JSON object per line (operations/logs.py)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args))
    except Exception:
        log.critical("the plugin server failed", exc_info=True)  # one log line, not a multi-line traceback
        return 1
    return 0


# -- operators' commands: smoke, health, docs (none imports LiteLLM) ---------------------------------------------
OPS_COMMANDS = ("smoke", "health", "docs")


def _add_ops_commands(sub: Any) -> None:
    env = os.environ.get
    smoke = sub.add_parser("smoke", help="send a chat request and a stream through Kong and say what happened")
    smoke.add_argument("--url", default=env("LLM_GATEWAY_SMOKE_URL", "http://localhost:8000"),
                       help="Kong's proxy URL (default http://localhost:8000)")
    smoke.add_argument("--key", default=env("LLM_GATEWAY_SMOKE_KEY"), required=not env("LLM_GATEWAY_SMOKE_KEY"),
                       help="a consumer's key-auth key, e.g. demo-key-alice (env LLM_GATEWAY_SMOKE_KEY)")
    smoke.add_argument("--model", default="demo", help="the alias to call (default demo)")
    smoke.add_argument("--timeout", type=float, default=60.0, help="seconds for each request (default 60)")
    smoke.add_argument("--ready-url", help="also check the plugin server's readiness first, e.g. "
                       "http://127.0.0.1:9542/health/ready")
    health = sub.add_parser("health", help="exit 0 when the plugin server is ready (the image's HEALTHCHECK)")
    health.add_argument("--url", help="readiness URL (default: from LLM_GATEWAY_METRICS_LISTEN, /health/ready)")
    docs = sub.add_parser("docs", help="print generated documentation")
    docs.add_argument("topic", choices=["config"], help="config: the plugin configuration reference (Markdown)")


def _run_ops_command(args: argparse.Namespace) -> int:
    if args.command == "smoke":
        from llm_gateway.operations import smoke

        return smoke.run(args.url, args.key, args.model, timeout=args.timeout, ready_url=args.ready_url)
    if args.command == "health":
        from llm_gateway.operations import smoke

        return smoke.health(args.url)
    from llm_gateway.operations import docs_reference

    sys.stdout.write(docs_reference.configuration_reference())
    return 0


def _check(files: list[str]) -> int:
    """Exit status 1, one line per problem on stderr, when any file would be refused."""
    from llm_gateway.kong.declarative_check import check_file

    failed = False
    for path in files:
        count, problems = check_file(path)
        for line in problems:
            print(line, file=sys.stderr)
        failed = failed or bool(problems)
        if not problems:
            print(f"{path}: {count} {PLUGIN_NAME} plugin config(s) valid")
    return 1 if failed else 0


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when Kong's worker (our parent) dies, so no orphan holds the ports."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _serve_http(app: object, sock: socket.socket) -> Any:
    """An aiohttp runner serving ``app`` (an application, or a runner made for it) on a listening socket."""
    from aiohttp import web

    runner = app if isinstance(app, web.BaseRunner) else web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=handover.BACKLOG).start()
    return runner


def _bind_metrics(listen: str, metrics: Any, health: Any) -> Any:
    """/metrics and health in a thread, bound at once if the port is free (None otherwise): before LiteLLM is
    imported, so health answers "starting" from the first moments (after a kong reload the predecessor holds
    the port until it steps aside, and ``_start_metrics`` binds it then)."""
    if listen == "off":
        return None
    from llm_gateway.accounting.metrics import start_metrics_server

    host, port = _host_port(listen)
    try:
        server = start_metrics_server(host, port, metrics, health)
    except OSError:
        return None
    log.info("Prometheus metrics on http://%s:%d/metrics, health on /health/live and /health/ready", host, port)
    return server


async def _start_metrics(listen: str, metrics: Any, health: Any, wait_s: float) -> Any:
    """Prometheus /metrics and health in a thread; after a kong reload, once the predecessor has let go of the
    port."""
    if listen == "off":
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            server = _bind_metrics(listen, metrics, health)
            if server is None:
                raise OSError("address in use")
            return server
        except OSError as exc:
            if time.monotonic() >= deadline:  # metrics are worth an error line, not an outage
                log.error("cannot serve metrics on %s: %s", listen, exc)
                return None
            await asyncio.sleep(0.1)


def _stop_metrics(server: Any) -> None:
    server.shutdown()
    server.server_close()


def _freeze_the_heap() -> None:
    """What LiteLLM's import and the warm-up left (~370,000 objects) lives as long as the process: moved out of
    the garbage collector's reach, so a full collection no longer walks it. Each one otherwise held the event
    loop for ~170 ms, every request in flight waiting (the saturated p99 inside Kong: docs/performance.md)."""
    gc.collect()
    gc.freeze()


async def _warm_up(demo_base: str) -> None:
    """One real call down each provider path, against the demo provider: LiteLLM imports much of itself
    lazily, and the first request should not pay for it."""
    from llm_gateway.config import Deployment
    from llm_gateway.providers import chat
    from llm_gateway.providers.openai_compatible import Usage
    from llm_gateway.providers.upstream import DEMO_API_KEY

    started = time.monotonic()
    messages = {"messages": [{"role": "user", "content": "warm up"}]}
    # demo/ takes the lean OpenAI-format path; hosted_vllm/ (OpenAI-compatible too) goes through acompletion
    for deployment in (Deployment("demo/warm-up", None, None, 10.0),
                       Deployment("hosted_vllm/warm-up", demo_base, DEMO_API_KEY, 10.0)):
        try:
            await chat.complete(deployment, messages, Usage())
        except Exception as exc:
            log.warning("warm-up call failed (%s); continuing", type(exc).__name__)
    log.info("provider paths warmed up in %.2f s", time.monotonic() - started)


async def serve(args: argparse.Namespace) -> None:
    _die_with_parent()
    parent = os.getppid()
    started = time.monotonic()
    from llm_gateway.accounting.metrics import Metrics
    from llm_gateway.operations.health import Health, fail_closed_redis, watch

    health = Health(stale_after=float(os.environ.get("LLM_GATEWAY_LIVENESS_STALE_S", "10")))
    # Kong's socket and the listener's port exist before the seconds of importing LiteLLM (see kong/handover.py):
    # what arrives meanwhile waits in the backlog and is served once the server is ready.
    previous = handover.predecessor(args.socket)
    rpc_socket = handover.UnixSocket(args.socket)
    listener_socket = handover.bind_tcp(*args.listen, "LLM listener", wait_s=0 if previous else 15)
    if listener_socket is None and previous is None:
        raise OSError(f"{args.listen[0]}:{args.listen[1]} is taken; cannot listen")
    metrics = Metrics()
    metrics_server = _bind_metrics(args.metrics_listen, metrics, health)  # health answers from now on
    health.enter("importing")
    from llm_gateway.config import ConfigRegistry
    from llm_gateway.kong.plugin import LLMGatewayPlugin
    from llm_gateway.kong.rpc_server import PluginServer
    from llm_gateway.kong.ticket import TicketBook
    from llm_gateway.listener.app import Listener
    from llm_gateway.providers import upstream  # imports LiteLLM: seconds of CPU
    from llm_gateway.providers.demo import demo_app
    from llm_gateway.runtime import Runtime

    logs.adopt("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")
    from llm_gateway.operations import tracing

    tracing.configure()  # LLM_GATEWAY_TRACING=on: OTLP export (operations/tracing.py); off by default
    log.info("LiteLLM imported in %.2f s", time.monotonic() - started)
    tickets = TicketBook(ttl_seconds=args.ticket_ttl,
                         predecessors=frozenset([previous.issuer]) if previous else frozenset())
    handover.announce(args.socket, tickets.issuer)
    runtime = Runtime(registry=ConfigRegistry(), tickets=tickets, metrics=metrics)
    if listener_socket is None:  # kong reload: the predecessor stops accepting and lets go of its ports
        assert previous is not None
        listener_socket = handover.take_over(previous, *args.listen, "LLM listener")
    demo_host, demo_port = args.demo_listen
    upstream.set_demo_base(f"http://{demo_host}:{demo_port}/v1")
    demo = handover.bind_tcp(demo_host, demo_port, "demo provider")
    if demo is None:
        raise OSError(f"{demo_host}:{demo_port} is taken; cannot listen")
    runners = [await _serve_http(demo_app(), demo)]
    health.enter("warming_up")
    await _warm_up(f"http://{demo_host}:{demo_port}/v1")
    _freeze_the_heap()
    if metrics_server is None:
        metrics_server = await _start_metrics(args.metrics_listen, metrics, health, wait_s=10 if previous else 0)

    plugin_server = PluginServer(PLUGIN_NAME, lambda config: LLMGatewayPlugin(config, runtime))
    runners.append(await _serve_http(Listener(runtime).make_runner(), listener_socket))
    rpc = await plugin_server.serve(rpc_socket.sock)
    watching = asyncio.create_task(watch(health, lambda: fail_closed_redis(runtime)))
    health.beat()
    health.enter("serving")
    log.info("plugin server ready on %s (pid %d) after %.2f s", args.socket, os.getpid(),
             time.monotonic() - started)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    stepped_aside = False

    async def step_aside() -> None:
        """A successor takes over (kong reload): its ports go to it at once; what is under way here finishes."""
        nonlocal stepped_aside
        if stepped_aside:
            return
        stepped_aside = True
        health.enter("stepped_aside")
        log.info("a new plugin server takes over; finishing the requests under way")
        rpc.close()
        for runner in runners:
            for site in list(runner.sites):
                await site.stop()
        if metrics_server is not None:
            await loop.run_in_executor(None, _stop_metrics, metrics_server)

    loop.add_signal_handler(handover.STEP_ASIDE, lambda: loop.create_task(step_aside()))

    async def housekeeping() -> None:
        while not stop.is_set():
            if os.getppid() != parent:  # the parent died and we were re-parented
                log.warning("parent process %d is gone; exiting", parent)
                stop.set()
            plugin_server.sweep()
            runtime.registry.sweep()
            await asyncio.sleep(1)

    chores = asyncio.create_task(housekeeping())
    await stop.wait()
    health.enter("stopping")
    chores.cancel()
    watching.cancel()
    rpc.close()
    rpc_socket.unlink_if_ours()
    for runner in runners:
        await runner.cleanup()  # lets requests under way finish (aiohttp's shutdown timeout) before closing
    await runtime.close()  # flushes usage records still queued for Redis
    await loop.run_in_executor(None, tracing.shutdown)  # exports the spans still buffered
    log.info("plugin server stopped")
