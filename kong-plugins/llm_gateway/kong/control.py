"""The control channel between the master plugin-server process and one worker: a socketpair, one JSON message
per frame (a 4-byte big-endian length, then the JSON).

Master → worker: ``acquire`` (a plugin instance's raw config, as Kong sent it), ``release``, ``read_timeout``
(what the master's access phase learnt of the Service), ``step_aside`` (kong reload), ``stop``. Worker → master:
``hello`` (its pid and listener port), ``ready`` (warmed up, accepting), ``ack`` (of an ``acquire``/``release``,
with an error message or None), ``beat`` (every second: its event loop turns). The end of the stream is the other
side's death: a worker exits when the master goes, the master restarts a worker that went.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

FRAME = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # a plugin config is kilobytes; anything near this is a bug, not a message


class Channel:
    """One end of a control socketpair on the running event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME)
        return cls(reader, writer)

    def send_nowait(self, message: dict[str, Any]) -> None:
        """Queue a message in order, without yielding to the loop (so the caller's check and its message stay one
        step: see ``ProcessPool._sync``). Lost silently when the other side is gone: its end of stream says so."""
        if self._writer.is_closing():
            return
        data = json.dumps(message, separators=(",", ":")).encode()
        self._writer.write(FRAME.pack(len(data)) + data)

    async def send(self, message: dict[str, Any]) -> None:
        self.send_nowait(message)
        try:
            await self._writer.drain()
        except ConnectionError:
            pass  # the other side is gone: its end of stream says so to whoever reads

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None at the end of the stream (the other process is gone)."""
        try:
            size = FRAME.unpack(await self._reader.readexactly(FRAME.size))[0]
            if size > MAX_FRAME:
                raise ValueError(f"control frame of {size} bytes")
            message = json.loads(await self._reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if not isinstance(message, dict):
            raise ValueError("control message is not an object")
        return message

    def close(self) -> None:
        self._writer.close()
