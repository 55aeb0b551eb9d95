"""The plugin server on every core: the master's pool of worker processes, and the zygote that forks them.

Kong runs one plugin server per plugin and talks to one Unix socket, so the master keeps Kong's RPC socket
(its access phases are light: a ticket) and serves a listener too, on the Service's port; N-1 workers
(``kong/worker.py``) serve the LLM listener on loopback ports of their own. The access phase picks the process
of each request (``ProcessPool.pick``) and tells Kong with one more PDK call, ``kong.service.set_target``
(none when it picks the master: the Service already points there); the ticket names that process.

* **Fork safety.** Workers are forked once LiteLLM is imported (its ~200 MB stay shared copy-on-write), never
  from a process running threads or an event loop: the master forks one *zygote* before its loop starts (the
  metrics thread paused for that moment, ``cli``), and the zygote, which does nothing else, forks every worker,
  the first ones and every restart, on the master's request. Each worker starts its own event loop.
* **Configs.** ``StartInstance``/``CloseInstance`` reach the master only: it pushes each instance's raw config
  to every worker and waits for their acks (``ACK_WAIT_S``) before answering Kong, so no request reaches a
  worker that does not know its config; a worker that does not ack is killed and restarted, and a (re)started
  worker gets every instance replayed before it joins the rotation.
* **Budgets.** Redis budgets are shared already. Memory budgets stay exact: every request of a consumer that
  has memory budgets on the route is pinned to one process (a hash of its id), whose store is then the only
  one charging it. Cooldowns and deployment health (``routing/state.py``) in memory are per process, each
  learning on its own; with Redis they are shared.
* **Failures.** A worker that dies (end of its control stream) is restarted after ``RESTART_DELAY_S``, with a
  log line and ``llm_gateway_process_restarts``; its pinned consumers go to the master meanwhile. A worker
  whose loop stops beating for ``stale_after`` leaves the rotation until it beats again. When the master dies
  the workers' control streams end and they exit; ``step_aside`` (kong reload) and ``stop`` go to all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_gateway.kong.control import Channel

if TYPE_CHECKING:
    from llm_gateway.config import GatewayConfig

log = logging.getLogger("llm_gateway.workers")

PR_SET_PDEATHSIG = 1
ACK_WAIT_S = 5.0  # a worker takes a config in well under a millisecond; this long means it is stuck
HELLO_WAIT_S = 30.0  # fork to listening: milliseconds, unless the machine is starved
RESTART_DELAY_S = 1.0  # as Kong respawns a dead plugin server: at most once a second


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no orphan holds ports or sockets."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def default_processes() -> int:
    """One process per core this process may run on."""
    count = getattr(os, "process_cpu_count", None)
    return max(1, (count() if count else None) or len(os.sched_getaffinity(0)) or os.cpu_count() or 1)


# -- the zygote ------------------------------------------------------------------------------------------------
RunWorker = Callable[[socket.socket, int, str], None]


class Zygote:
    """The master's handle on its zygote: a SOCK_SEQPACKET socket carrying fork requests and their control fds."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid

    def fork(self, index: int, target: str, control: socket.socket) -> None:
        """Ask for worker ``index``, whose tickets are named ``target``, its end of the control channel attached."""
        request = json.dumps({"index": index, "target": target}).encode()
        socket.send_fds(self.sock, [request], [control.fileno()])

    def close(self) -> None:
        """The zygote exits at the end of its stream."""
        self.sock.close()


def fork_zygote(run_worker: RunWorker, inherited: Iterable[Any], at_exit: Callable[[], None] = lambda: None) -> Zygote:
    """Fork the zygote now; the caller guarantees that no other thread runs and no event loop exists.
    ``inherited``: the master's listening sockets (and servers), closed in the zygote so that only the master
    holds Kong's socket and the listener's port (a successor after kong reload must be able to bind it).
    ``at_exit`` runs when the zygote ends, i.e. when the master has gone, however it went (even SIGKILL)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the zygote
        code = 0
        try:
            ours.close()
            for item in inherited:
                if item is not None:
                    with contextlib.suppress(OSError):
                        (getattr(item, "socket", None) or item).close()
            try:
                _zygote(theirs, run_worker)
            finally:
                at_exit()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    log.info("zygote forked (pid %d)", pid)
    return Zygote(ours, pid)


def _zygote(sock: socket.socket, run_worker: RunWorker) -> None:
    die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers: the master watches them
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the master's to handle
    signal.signal(signal.SIGTERM, _exit_on_signal)  # the master's death (PDEATHSIG): end through at_exit
    if os.getppid() == 1:
        return  # the master died before the line above
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        if not data:
            return  # the master is gone or done
        request = json.loads(data)
        if os.fork() == 0:  # the worker
            sock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            die_with_parent()
            run_worker(socket.socket(fileno=fds[0]), int(request["index"]), str(request["target"]))
            os._exit(0)  # run_worker does not return; never run the zygote's loop in a worker
        for fd in fds:
            os.close(fd)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def pinned_slot(consumer: str, size: int) -> int:
    """The process (0: the master) serving every request of a consumer with memory budgets: the same one for
    as long as this master lives."""
    return zlib.crc32(consumer.encode()) % size


# -- the pool, on the master's event loop ----------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where the access phase sends a request (``kong.service.set_target``) and whose name its ticket carries."""

    token: str
    host: str
    port: int


@dataclass(eq=False)
class Worker:
    index: int
    token: str
    channel: Channel | None = None
    hello: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    pid: int = 0
    target: Target | None = None
    ready: bool = False  # warmed up and accepting
    synced: bool = False  # every instance replayed and acked
    gone: bool = False
    last_beat: float = 0.0
    born: float = field(default_factory=time.time)
    pending: dict[int, asyncio.Future] = field(default_factory=dict)


class ProcessPool:
    """The master's workers: their lives, the configs they hold, and which process serves a request."""

    def __init__(self, size: int, host: str, zygote: Zygote, *, on_restart: Callable[[], None] = lambda: None,
                 stale_after: float = 10.0) -> None:
        self.size = size
        self.host = host
        self.zygote = zygote
        self.on_restart = on_restart
        self.stale_after = stale_after
        self.workers: dict[int, Worker] = {}
        self.instances: dict[int, dict[str, Any]] = {}  # what every worker must hold: instance id → raw config
        self.read_timeouts: dict[str, float] = {}
        self.restarts = 0
        self.stepped_aside = False
        self.closing = False
        self._rotation: list[Target | None] = [None]  # None: the master itself
        self._next = itertools.count()
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []

    # -- lives ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        for index in range(1, self.size):
            self._tasks.append(asyncio.create_task(self._keep(index), name=f"llm_gateway.worker-{index}"))

    async def wait_ready(self, wait_s: float) -> bool:
        """True once every worker serves (the master's Kong socket opens then, or after ``wait_s``)."""
        deadline = time.monotonic() + wait_s
        while not self.all_serving():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _keep(self, index: int) -> None:
        """Worker ``index``, born and reborn until the pool closes or steps aside."""
        while not (self.closing or self.stepped_aside):
            worker = self.workers[index] = Worker(index, secrets.token_hex(4))
            try:
                await self._life(worker)
            except Exception:
                log.exception("worker %d: its control channel failed", index)
            finally:
                worker.gone = True
                for future in worker.pending.values():
                    if not future.done():
                        future.set_result("gone")
                self._refresh()
            if self.closing or self.stepped_aside:
                return
            self.restarts += 1
            self.on_restart()
            log.warning("worker %d (pid %s) exited; restarting it in %g s", index, worker.pid or "?",
                        RESTART_DELAY_S)
            await asyncio.sleep(RESTART_DELAY_S)

    async def _life(self, worker: Worker) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.zygote.fork(worker.index, worker.token, theirs)
        except OSError:
            ours.close()
            log.error("worker %d: the zygote is gone; cannot fork", worker.index)
            raise
        finally:
            theirs.close()
        worker.channel = await Channel.open(ours)
        reading = asyncio.create_task(self._read(worker))
        await asyncio.wait({reading, worker.hello}, timeout=HELLO_WAIT_S,
                           return_when=asyncio.FIRST_COMPLETED)
        if not worker.hello.done():
            log.error("worker %d never said hello in %g s", worker.index, HELLO_WAIT_S)
            worker.channel.close()  # the worker reads the end of its stream and exits
            reading.cancel()
            return
        await self._sync(worker)
        await reading

    async def _read(self, worker: Worker) -> None:
        assert worker.channel is not None
        while (message := await worker.channel.receive()) is not None:
            op = message.get("op")
            if op == "beat":
                stale = not self._serving(worker, time.monotonic())
                worker.last_beat = time.monotonic()
                if stale:
                    self._refresh()
            elif op == "ack":
                future = worker.pending.pop(int(message["id"]), None)
                if future is not None and not future.done():
                    future.set_result(message.get("error"))
            elif op == "hello":
                worker.pid = int(message["pid"])
                worker.target = Target(worker.token, self.host, int(message["port"]))
                worker.hello.set_result(None)
                if self.closing or self.stepped_aside:  # born while the pool was ending
                    worker.channel.send_nowait({"op": "stop" if self.closing else "step_aside"})
            elif op == "ready":
                worker.ready, worker.last_beat = True, time.monotonic()
                self._refresh()
        worker.channel.close()

    def _send(self, worker: Worker, message: dict[str, Any]) -> asyncio.Future:
        """Queue a request to a worker now (no yield); its ack arrives in the returned future."""
        assert worker.channel is not None
        mid = next(self._ids)
        future = worker.pending[mid] = asyncio.get_running_loop().create_future()
        worker.channel.send_nowait({**message, "id": mid})
        return future

    async def _acked(self, worker: Worker, future: asyncio.Future, what: str) -> None:
        try:
            error = await asyncio.wait_for(future, ACK_WAIT_S)
        except TimeoutError:
            error = f"no ack in {ACK_WAIT_S:g} s"
        if error and error != "gone":
            log.error("worker %d did not take %s (%s); restarting it", worker.index, what, error)
            self._kill(worker)

    async def _sync(self, worker: Worker) -> None:
        """Replay every instance (and what Kong's Service told the access phase) to a newly born worker. The
        snapshot and its messages are one step of the loop: a release after it is queued after them."""
        acks = [self._send(worker, {"op": "acquire", "iid": iid, "config": config})
                for iid, config in self.instances.items()]
        for key, seconds in self.read_timeouts.items():
            worker.channel.send_nowait({"op": "read_timeout", "key": key, "seconds": seconds})  # type: ignore[union-attr]
        await asyncio.gather(*(self._acked(worker, ack, "its configs") for ack in acks))
        worker.synced = not worker.gone
        self._refresh()

    def _kill(self, worker: Worker) -> None:
        if worker.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        if worker.channel is not None:
            worker.channel.close()

    def _reachable(self) -> list[Worker]:
        return [w for w in self.workers.values() if not w.gone and w.hello.done()]

    # -- configs (plugin instances) -----------------------------------------------------------------------
    async def acquire(self, iid: int, config: dict[str, Any]) -> None:
        """Every worker holds instance ``iid`` when this returns (or has been told to restart)."""
        self.instances[iid] = config
        acks = [(w, self._send(w, {"op": "acquire", "iid": iid, "config": config})) for w in self._reachable()]
        await asyncio.gather(*(self._acked(w, ack, f"instance {iid}") for w, ack in acks))

    async def release(self, iid: int) -> None:
        self.instances.pop(iid, None)
        acks = [(w, self._send(w, {"op": "release", "iid": iid})) for w in self._reachable()]
        await asyncio.gather(*(self._acked(w, ack, f"the release of instance {iid}") for w, ack in acks))

    def read_timeout(self, key: str, seconds: float) -> None:
        """The Service's read timeout the access phase learnt for a config: every worker cuts deadlines to it."""
        if self.read_timeouts.get(key) == seconds:
            return
        self.read_timeouts[key] = seconds
        for worker in self._reachable():
            worker.channel.send_nowait({"op": "read_timeout", "key": key, "seconds": seconds})  # type: ignore[union-attr]

    # -- which process serves a request --------------------------------------------------------------------
    def pick(self, config: GatewayConfig, consumer: dict[str, Any] | None) -> Target | None:
        """The process for one request: round-robin, except that a consumer with memory budgets on this route
        always goes to the same one (its budget lives in that process's memory). None: the master."""
        if self.stepped_aside:  # the Service's port is the successor's: its answer is a retryable 503
            return None
        if config.budgets and config.redis is None and consumer:
            cid, username = consumer.get("id"), consumer.get("username")
            if any(budget.applies_to(username, cid) for budget in config.budgets):
                slot = pinned_slot(str(cid or username), self.size)
                worker = self.workers.get(slot)
                if worker is not None and self._serving(worker, time.monotonic()):
                    return worker.target
                return None
        return self._rotation[next(self._next) % len(self._rotation)]

    def _serving(self, worker: Worker, now: float) -> bool:
        return (worker.synced and worker.ready and not worker.gone
                and now - worker.last_beat <= self.stale_after)

    def _refresh(self) -> None:
        now = time.monotonic()
        self._rotation = [None, *(w.target for _, w in sorted(self.workers.items()) if self._serving(w, now))]

    def tick(self) -> None:
        """Once a second: a worker whose loop stopped beating leaves the rotation."""
        self._refresh()

    def all_serving(self) -> bool:
        now = time.monotonic()
        return len(self.workers) == self.size - 1 and all(self._serving(w, now) for w in self.workers.values())

    # -- reports -------------------------------------------------------------------------------------------
    def status(self, master_port: int) -> list[dict[str, Any]]:
        """GetStatus's ``Processes``: the master first."""
        now = time.monotonic()
        rows: list[dict[str, Any]] = [{"Index": 0, "Pid": os.getpid(), "Port": master_port, "Serving": True,
                                       "Role": "master"}]
        for index, w in sorted(self.workers.items()):
            rows.append({"Index": index, "Pid": w.pid, "Port": w.target.port if w.target else None,
                         "Serving": self._serving(w, now), "Role": "worker", "StartTime": w.born})
        return rows

    def health(self) -> dict[str, dict[str, Any]]:
        """The readiness check the master's /health/ready adds: every worker serving."""
        now = time.monotonic()
        down = [i for i in range(1, self.size) if i not in self.workers or not self._serving(self.workers[i], now)]
        detail = f"{self.size - 1 - len(down)} of {self.size - 1} workers serving"
        if down:
            detail += f" (not: {', '.join(map(str, down))})"
        return {"processes": {"ok": not down, "detail": detail + f"; {self.restarts} restarts"}}

    # -- the end ---------------------------------------------------------------------------------------------
    def step_aside(self) -> None:
        """kong reload: every worker stops accepting and finishes what it has; new tickets name the master."""
        self.stepped_aside = True
        self._rotation = [None]
        for worker in self._reachable():
            worker.channel.send_nowait({"op": "step_aside"})  # type: ignore[union-attr]

    async def stop(self, wait_s: float) -> None:
        """Every worker finishes its requests and exits (killed after ``wait_s``); then the zygote."""
        self.closing = True
        for worker in self._reachable():
            worker.channel.send_nowait({"op": "stop"})  # type: ignore[union-attr]
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=wait_s)
            for worker in self.workers.values():
                if not worker.gone:
                    log.warning("worker %d did not stop in %g s; killing it", worker.index, wait_s)
                    self._kill(worker)
            for task in pending:
                task.cancel()
        self.zygote.close()
