"""A worker process of the plugin server: the LLM listener on a loopback port of its own, nothing of Kong's.

Forked (by the zygote, ``kong/workers.py``) from the master once LiteLLM is imported: the import's ~200 MB
stay shared copy-on-write, and the ticket secret arrives with the memory, never through a file, argv or the
environment. It binds an ephemeral port on the listener's host, tells the master (``hello``), warms its own
provider paths up on its own event loop, and serves what the master's access phase sends it with
``kong.service.set_target``. It holds a mirror of every plugin instance the master holds, pushed over the
control channel before ``StartInstance`` returns to Kong, so a request never meets an unknown config here.

It exits when the master goes (end of the control stream, or SIGTERM from the zygote's death) and on ``stop``,
letting the requests under way finish; on ``step_aside`` (kong reload) it stops accepting and finishes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from llm_gateway.accounting.metrics import Metrics
from llm_gateway.config import ConfigRegistry
from llm_gateway.kong import handover
from llm_gateway.kong.control import Channel
from llm_gateway.kong.ticket import TicketBook
from llm_gateway.operations import logs

log = logging.getLogger("llm_gateway.worker")

BEAT_S = 1.0


@dataclass
class WorkerSetup:
    """What a worker takes from the master at fork: shared objects, and how to warm up."""

    listen_host: str
    tickets: TicketBook
    metrics: Metrics
    warm_up: Callable[[], Awaitable[None]]  # cli's provider warm-up and heap freeze


async def serve(setup: WorkerSetup, control: socket.socket, index: int, target: str) -> None:
    """The worker's whole life, on its own event loop."""
    from aiohttp import web

    from llm_gateway.kong.plugin import LLMGatewayPlugin
    from llm_gateway.listener.app import Listener
    from llm_gateway.operations import tracing
    from llm_gateway.runtime import Runtime

    started = time.monotonic()
    tracing.configure()  # after the fork: an exporter's thread must not be carried across it
    logs.write_in_background()  # the same for the log's writer thread
    setup.tickets.target = target
    runtime = Runtime(registry=ConfigRegistry(), tickets=setup.tickets, metrics=setup.metrics)
    channel = await Channel.open(control)
    sock = handover.bind_tcp(setup.listen_host, 0, f"LLM listener of worker {index}", wait_s=0)
    if sock is None:
        raise OSError(f"worker {index}: cannot bind a port on {setup.listen_host}")
    port = sock.getsockname()[1]
    await channel.send({"op": "hello", "pid": os.getpid(), "port": port})

    instances: dict[int, Any] = {}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner: web.AppRunner | None = None
    chores: set[asyncio.Task] = set()

    async def step_aside() -> None:
        if runner is not None:
            for site in list(runner.sites):
                await site.stop()
        log.info("worker %d stepped aside; finishing the requests under way", index)

    def handle(message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "acquire":
            error = None
            iid = int(message["iid"])
            if iid not in instances:  # idempotent: a restarted worker's replay may cross a live push
                try:
                    instances[iid] = LLMGatewayPlugin(message["config"], runtime)
                except Exception as exc:  # the master parsed the same config: this is not the config's fault
                    log.exception("worker %d could not hold instance %d", index, iid)
                    error = type(exc).__name__
            channel.send_nowait({"op": "ack", "id": message["id"], "error": error})
        elif op == "release":
            instance = instances.pop(int(message["iid"]), None)
            if instance is not None:
                instance.close()
            channel.send_nowait({"op": "ack", "id": message["id"], "error": None})
        elif op == "read_timeout":
            config = runtime.registry.get(message["key"])
            if config is not None:
                runtime.note_kong_read_timeout(config, float(message["seconds"]))
        elif op == "step_aside":
            task = loop.create_task(step_aside())
            chores.add(task)
            task.add_done_callback(chores.discard)
        elif op == "stop":
            stop.set()

    async def listen() -> None:
        while (message := await channel.receive()) is not None:
            handle(message)
        log.warning("worker %d: the master is gone; exiting", index)
        stop.set()

    async def beat() -> None:
        while True:
            channel.send_nowait({"op": "beat"})
            runtime.registry.sweep()
            await asyncio.sleep(BEAT_S)

    listening = asyncio.create_task(listen())
    await setup.warm_up()
    runner = Listener(runtime).make_runner()
    await runner.setup()
    await web.SockSite(runner, sock, backlog=handover.BACKLOG).start()
    await channel.send({"op": "ready"})
    beating = asyncio.create_task(beat())
    log.info("worker %d ready on %s:%d (pid %d) after %.2f s", index, setup.listen_host, port, os.getpid(),
             time.monotonic() - started)
    await stop.wait()
    beating.cancel()
    listening.cancel()
    await runner.cleanup()  # lets requests under way finish (aiohttp's shutdown timeout)
    for instance in instances.values():
        instance.close()
    await runtime.close()  # flushes usage records still queued for Redis
    await loop.run_in_executor(None, tracing.shutdown)
    channel.close()
    log.info("worker %d stopped", index)


def run(setup: WorkerSetup, control: socket.socket, index: int, target: str) -> None:
    """The forked child's entry point: never returns into the zygote's code."""
    code = 0
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(setup, control, index, target))
    except Exception:
        log.critical("worker %d failed", index, exc_info=True)
        code = 1
    finally:
        logs.stop_writing_in_background()  # os._exit runs no atexit: the queued lines are written here
        logging.shutdown()
    os._exit(code)
