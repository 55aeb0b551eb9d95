"""The plugin server's two sockets across its lifetimes: bound early at start, handed over on ``kong reload``.

At start Kong connects at once and does not wait (``[crit] connect() failed`` and a 500 otherwise), while
LiteLLM takes seconds to import: both sockets are bound and listening within moments, and what arrives waits
in their backlogs until the server accepts.

On ``kong reload`` nginx starts new workers before the old ones finish their requests, and the new worker 0
starts a new plugin server while the old one still serves the old workers' streams and holds the listener's
port. The new server takes over: it binds Kong's socket path (new workers connect there; the old server's
already accepted connections go on), reads who came before from ``<socket>.server``, and once it is ready asks
that predecessor (SIGUSR2) to stop accepting. The predecessor closes its listening sockets at once and keeps
serving what it already has until its own worker is gone (SIGTERM from Kong, or its parent's death). Tickets
name their issuer: one minted by the predecessor that reaches the new listener in the moment of the switch is
answered 503 retryable, not refused as a bypass (``ticket.PredecessorTicket``). With several processes
(``kong/workers.py``) only the master takes part: a predecessor master tells its workers to stop accepting and
finish their streams too, and names itself in the tickets it still mints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("llm_gateway.handover")

BACKLOG = 4096
STEP_ASIDE = signal.SIGUSR2
TAKEOVER_WAIT_S = 10.0  # how long the predecessor may take to let go of the port before it is told to stop


@dataclass(frozen=True)
class Predecessor:
    pid: int
    issuer: str


def _record_path(socket_path: str) -> Path:
    return Path(socket_path + ".server")


def _is_plugin_server(pid: int) -> bool:
    """A live plugin server (never signal a process that merely reused a pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z" and b"serve" in argv and any(b"llm_gateway" in a or b"kong-llm-gateway" in a for a in argv)


def predecessor(socket_path: str) -> Predecessor | None:
    """The plugin server that last served this socket path, if it is still running."""
    try:
        data = json.loads(_record_path(socket_path).read_text())
        found = Predecessor(pid=int(data["pid"]), issuer=str(data["issuer"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if found.pid == os.getpid() or not _is_plugin_server(found.pid):
        return None
    return found


def announce(socket_path: str, issuer: str) -> None:
    """Tell the next plugin server on this socket path who to take over from."""
    path = _record_path(socket_path)
    temporary = path.with_name(path.name + f".{os.getpid()}")
    temporary.write_text(json.dumps({"pid": os.getpid(), "issuer": issuer}))
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


class UnixSocket:
    """Kong's socket: bound and listening at once; removed at the end only if it is still this server's."""

    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale, or the predecessor's: its accepted connections live on without the path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o660)
        self.sock.listen(BACKLOG)
        self._inode = os.stat(path).st_ino

    def unlink_if_ours(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:  # a successor may have bound the path since
                os.unlink(self.path)


def bind_tcp(host: str, port: int, what: str, wait_s: float = 15.0) -> socket.socket | None:
    """Bind and listen, retrying for ``wait_s`` while another process holds the port; None if it still does."""
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(BACKLOG)
            log.info("%s listening on %s:%d", what, host, port)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


def take_over(previous: Predecessor, host: str, port: int, what: str) -> socket.socket:
    """Ask the predecessor to stop accepting, then bind the port it lets go of."""
    log.info("taking over from plugin server %d (kong reload)", previous.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(previous.pid, STEP_ASIDE)
    sock = bind_tcp(host, port, what, TAKEOVER_WAIT_S)
    if sock is None:  # it did not answer the hand-over: it is stuck, and new requests wait on us
        log.warning("plugin server %d did not let go of %s:%d; stopping it", previous.pid, host, port)
        with contextlib.suppress(ProcessLookupError):
            os.kill(previous.pid, signal.SIGTERM)
        sock = bind_tcp(host, port, what, TAKEOVER_WAIT_S)
    if sock is None:
        raise OSError(f"{host}:{port} is still taken; cannot listen")
    return sock
