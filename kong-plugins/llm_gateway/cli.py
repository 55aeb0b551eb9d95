"""``kong-llm-gateway dump`` (Kong's query_cmd) and ``kong-llm-gateway serve`` (Kong's start_cmd).

``dump`` must be fast and print only JSON: Kong runs it in every process that loads schemas and decodes the
whole of stdout. ``serve`` logs to stderr (Kong logs it at INFO) and binds Kong's socket last, once LiteLLM is
imported and warmed up and the listener is up, so Kong's first connection meets a ready server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time

from llm_gateway import PLUGIN_NAME
from llm_gateway.schema import plugin_info

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
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("LLM_GATEWAY_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))
    return 0


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when Kong's worker (our parent) dies, so no orphan holds the ports."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _start_site(app: object, host: str, port: int, what: str) -> object:
    """Bind an aiohttp app, retrying while a previous server (being replaced by Kong) still holds the port."""
    from aiohttp import web

    runner = app if isinstance(app, web.BaseRunner) else web.AppRunner(app, access_log=None)
    await runner.setup()
    deadline = time.monotonic() + 15
    while True:
        try:
            await web.TCPSite(runner, host, port, backlog=4096).start()
            log.info("%s listening on %s:%d", what, host, port)
            return runner
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def _warm_up(demo_base: str) -> None:
    """One real call down each provider path, against the demo provider: LiteLLM imports much of itself
    lazily, and the first request should not pay for it."""
    from llm_gateway import providers
    from llm_gateway.config import Deployment
    from llm_gateway.openai_compatible import Usage

    started = time.monotonic()
    messages = {"messages": [{"role": "user", "content": "warm up"}]}
    # demo/ takes the lean OpenAI-format path; hosted_vllm/ (OpenAI-compatible too) goes through acompletion
    for deployment in (Deployment("demo/warm-up", None, None, 10.0),
                       Deployment("hosted_vllm/warm-up", demo_base, providers.DEMO_API_KEY, 10.0)):
        try:
            await providers.complete(deployment, messages, Usage())
        except Exception as exc:
            log.warning("warm-up call failed (%s); continuing", type(exc).__name__)
    log.info("provider paths warmed up in %.2f s", time.monotonic() - started)


async def serve(args: argparse.Namespace) -> None:
    _die_with_parent()
    parent = os.getppid()
    started = time.monotonic()
    from llm_gateway import providers  # imports LiteLLM: seconds of CPU, done before Kong can connect
    from llm_gateway.config import ConfigRegistry
    from llm_gateway.demo_provider import demo_app
    from llm_gateway.listener import Listener
    from llm_gateway.plugin import LLMGatewayPlugin
    from llm_gateway.rpc_server import PluginServer
    from llm_gateway.runtime import Runtime
    from llm_gateway.ticket import TicketBook

    log.info("LiteLLM imported in %.2f s", time.monotonic() - started)
    runtime = Runtime(registry=ConfigRegistry(), tickets=TicketBook(ttl_seconds=args.ticket_ttl))
    demo_host, demo_port = args.demo_listen
    providers.set_demo_base(f"http://{demo_host}:{demo_port}/v1")
    runners = [await _start_site(demo_app(), demo_host, demo_port, "demo provider"),
               await _start_site(Listener(runtime).make_runner(), *args.listen, "LLM listener")]
    await _warm_up(f"http://{demo_host}:{demo_port}/v1")
    if args.metrics_listen != "off":
        from llm_gateway.metrics import start_metrics_server

        metrics_host, metrics_port = _host_port(args.metrics_listen)
        try:
            start_metrics_server(metrics_host, metrics_port, runtime.metrics)
            log.info("Prometheus metrics on http://%s:%d/metrics", metrics_host, metrics_port)
        except OSError as exc:  # metrics are worth an error line, not an outage
            log.error("cannot serve metrics on %s: %s", args.metrics_listen, exc)

    plugin_server = PluginServer(PLUGIN_NAME, lambda config: LLMGatewayPlugin(config, runtime))
    rpc = await plugin_server.serve(args.socket)
    log.info("plugin server ready on %s (pid %d) after %.2f s", args.socket, os.getpid(),
             time.monotonic() - started)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

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
    chores.cancel()
    rpc.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    for runner in runners:
        await runner.cleanup()  # type: ignore[attr-defined]
    await runtime.close()  # flushes usage records still queued for Redis
    log.info("plugin server stopped")
