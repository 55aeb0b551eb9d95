"""``kong-llm-gateway dump`` (Kong's query_cmd) and ``kong-llm-gateway serve`` (Kong's start_cmd).

``dump`` must be fast and print only JSON: Kong runs it in every process that loads schemas and decodes the
whole of stdout. ``serve`` logs to stderr (Kong logs it at INFO). It binds Kong's socket and the listener's
port first, within milliseconds of being started, and accepts on them only once LiteLLM is imported and
warmed up: Kong's calls made meanwhile wait in the sockets' backlogs and are answered late rather than
refused (Kong would answer a refused connect() with a bare 500). With ``--processes N`` (default: one per core)
it forks N-1 worker processes once LiteLLM is imported (``kong/workers.py``); N=1 is the single process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from llm_gateway import PLUGIN_NAME
from llm_gateway.kong import handover, workers
from llm_gateway.kong.schema import plugin_info
from llm_gateway.operations import logs

log = logging.getLogger("llm_gateway")

DEFAULT_LISTEN = "127.0.0.1:8787"
DEFAULT_DEMO_LISTEN = "127.0.0.1:8788"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9542"


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
    serve.add_argument("--processes", type=_positive, default=env("LLM_GATEWAY_PROCESSES") or None,
                       help="plugin-server processes: the master and N-1 workers (env LLM_GATEWAY_PROCESSES; "
                       "default: one per core)")
    return parser


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


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
    if args.processes is None:
        args.processes = workers.default_processes()
    elif isinstance(args.processes, str):  # argparse does not convert a default: the environment's value
        args.processes = _positive(args.processes)
    metrics_dir = None
    try:
        metrics_dir = _metrics_dir(args.processes)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args, _prepare(args)))
    except Exception:
        log.critical("the plugin server failed", exc_info=True)  # one log line, not a multi-line traceback
        return 1
    finally:
        logs.stop_writing_in_background()  # the lines still queued, then synchronous writes to the end
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


_OWN_METRICS_DIR: list[str] = []  # the multiprocess directory this plugin server made, if it made one


def _remove_metrics_dir() -> None:
    """The zygote outlives a master killed outright by moments: it removes the directory then (the workers
    finishing their streams keep their open files; nobody can scrape them any more)."""
    for path in _OWN_METRICS_DIR:
        shutil.rmtree(path, ignore_errors=True)


def _metrics_dir(processes: int) -> str | None:
    """Several processes: Prometheus's multiprocess mode, in an empty directory of this plugin server's own
    (removed at the end), unless the operator set ``PROMETHEUS_MULTIPROC_DIR``. Before anything imports
    prometheus_client, which picks its storage at import (accounting/metrics.py)."""
    if processes < 2 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    path = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    _OWN_METRICS_DIR.append(path)
    return path


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


WORKERS_READY_WAIT_S = 30.0  # at start the master opens Kong's socket once every worker serves, or after this
WORKERS_STOP_S = 65.0  # a worker finishing its streams: aiohttp's shutdown timeout (60 s), then it is killed


@dataclass
class Prepared:
    """What the synchronous start (before any event loop exists, so before any fork) hands the serving loop."""

    started: float
    parent: int
    health: Any
    metrics: Any
    previous: handover.Predecessor | None
    rpc_socket: handover.UnixSocket
    listener_socket: socket.socket
    metrics_server: Any
    tickets: Any
    zygote: workers.Zygote | None


def _prepare(args: argparse.Namespace) -> Prepared:
    """Kong's socket and the listener's port, health, LiteLLM's import, the ticket secret, then the zygote:
    forked here, while no other thread runs and no event loop exists (kong/workers.py)."""
    workers.die_with_parent()
    parent = os.getppid()
    started = time.monotonic()
    from llm_gateway.accounting.metrics import Metrics
    from llm_gateway.operations.health import Health

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
    from llm_gateway.kong.plugin import LLMGatewayPlugin  # noqa: F401  (imported once, shared by the workers)
    from llm_gateway.kong.ticket import TicketBook
    from llm_gateway.listener.app import Listener  # noqa: F401
    from llm_gateway.providers import upstream  # imports LiteLLM: seconds of CPU

    logs.adopt("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")
    log.info("LiteLLM imported in %.2f s", time.monotonic() - started)
    tickets = TicketBook(ttl_seconds=args.ticket_ttl,
                         predecessors=frozenset([previous.issuer]) if previous else frozenset())
    handover.announce(args.socket, tickets.issuer)
    if listener_socket is None:  # kong reload: the predecessor stops accepting and lets go of its ports
        assert previous is not None
        listener_socket = handover.take_over(previous, *args.listen, "LLM listener")
    demo_host, demo_port = args.demo_listen
    upstream.set_demo_base(f"http://{demo_host}:{demo_port}/v1")
    zygote = None
    if args.processes > 1:
        zygote = _fork_zygote(args, tickets, metrics, [rpc_socket.sock, listener_socket], metrics_server)
    return Prepared(started, parent, health, metrics, previous, rpc_socket, listener_socket, metrics_server,
                    tickets, zygote)


def _fork_zygote(args: argparse.Namespace, tickets: Any, metrics: Any, sockets: list[socket.socket],
                 metrics_server: Any) -> workers.Zygote:
    """The one fork of the master: the metrics thread paused meanwhile (it restarts at once), the heap frozen
    first, so that a collection in a worker never writes to (and so copies) the pages of the import's objects."""
    from llm_gateway.accounting.metrics import pause_metrics_server, resume_metrics_server
    from llm_gateway.kong import worker

    demo_host, demo_port = args.demo_listen

    async def warm_up() -> None:
        await _warm_up(f"http://{demo_host}:{demo_port}/v1")
        _freeze_the_heap()

    setup = worker.WorkerSetup(listen_host=args.listen[0], tickets=tickets, metrics=metrics, warm_up=warm_up)
    if metrics_server is not None:
        pause_metrics_server(metrics_server)
    _freeze_the_heap()
    try:
        return workers.fork_zygote(functools.partial(worker.run, setup), [*sockets, metrics_server],
                                   at_exit=_remove_metrics_dir)
    finally:
        if metrics_server is not None:
            resume_metrics_server(metrics_server)


async def serve(args: argparse.Namespace, prepared: Prepared) -> None:
    from llm_gateway.config import ConfigRegistry
    from llm_gateway.kong.plugin import LLMGatewayPlugin
    from llm_gateway.kong.rpc_server import PluginServer
    from llm_gateway.listener.app import Listener
    from llm_gateway.operations import tracing
    from llm_gateway.operations.health import fail_closed_redis, watch
    from llm_gateway.providers.demo import demo_app
    from llm_gateway.runtime import Runtime

    tracing.configure()  # LLM_GATEWAY_TRACING=on: OTLP export (operations/tracing.py); after the fork (its thread)
    logs.write_in_background()  # after the fork too: stderr is Kong's pipe, never written from the event loop
    health, metrics, started, parent = prepared.health, prepared.metrics, prepared.started, prepared.parent
    metrics_server, previous = prepared.metrics_server, prepared.previous
    runtime = Runtime(registry=ConfigRegistry(), tickets=prepared.tickets, metrics=metrics)
    pool: workers.ProcessPool | None = None
    if prepared.zygote is not None:
        pool = workers.ProcessPool(args.processes, args.listen[0], prepared.zygote,
                                   on_restart=metrics.process_restarted, stale_after=health.stale_after)
        health.extra = pool.health
    demo_host, demo_port = args.demo_listen
    demo = handover.bind_tcp(demo_host, demo_port, "demo provider")
    if demo is None:
        raise OSError(f"{demo_host}:{demo_port} is taken; cannot listen")
    runners = [await _serve_http(demo_app(), demo)]
    if pool is not None:
        pool.start()  # the workers warm up meanwhile, each on its own core
    health.enter("warming_up")
    await _warm_up(f"http://{demo_host}:{demo_port}/v1")
    _freeze_the_heap()
    if metrics_server is None:
        metrics_server = await _start_metrics(args.metrics_listen, metrics, health, wait_s=10 if previous else 0)

    plugin_server = PluginServer(
        PLUGIN_NAME, lambda config: LLMGatewayPlugin(config, runtime, pool),
        on_start=pool.acquire if pool else None, on_close=pool.release if pool else None,
        status=lambda: {"Processes": pool.status(args.listen[1]) if pool else [
            {"Index": 0, "Pid": os.getpid(), "Port": args.listen[1], "Serving": True, "Role": "master"}]})
    runners.append(await _serve_http(Listener(runtime).make_runner(), prepared.listener_socket))
    if pool is not None and not await pool.wait_ready(WORKERS_READY_WAIT_S):
        log.warning("not every worker serves after %g s; starting with those that do", WORKERS_READY_WAIT_S)
    rpc = await plugin_server.serve(prepared.rpc_socket.sock)
    watching = asyncio.create_task(watch(health, lambda: fail_closed_redis(runtime)))
    health.beat()
    health.enter("serving")
    log.info("plugin server ready on %s (pid %d, %d process%s) after %.2f s", args.socket, os.getpid(),
             args.processes, "" if args.processes == 1 else "es", time.monotonic() - started)

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
        if pool is not None:
            pool.step_aside()  # the workers stop accepting too; new tickets name the master (a retryable 503)
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
            if pool is not None:
                pool.tick()
            await asyncio.sleep(1)

    chores = asyncio.create_task(housekeeping())
    await stop.wait()
    health.enter("stopping")
    chores.cancel()
    watching.cancel()
    rpc.close()
    prepared.rpc_socket.unlink_if_ours()
    stopping = asyncio.create_task(pool.stop(WORKERS_STOP_S)) if pool is not None else None
    for runner in runners:
        await runner.cleanup()  # lets requests under way finish (aiohttp's shutdown timeout) before closing
    if stopping is not None:
        await stopping
    await runtime.close()  # flushes usage records still queued for Redis
    await loop.run_in_executor(None, tracing.shutdown)  # exports the spans still buffered
    log.info("plugin server stopped")
