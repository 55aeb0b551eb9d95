"""Hand-off tickets: proof that a request reaching the loopback listener went through Kong's access phase.

Kong fails open (a plugin-server error lets the request through to the Service), and anything on the host can
reach a loopback port, so the listener trusts nothing but a ticket: an HMAC, keyed by a secret born in this
process, over the config the request was admitted under, a single-use nonce, an expiry, the consumer, and the
SHA-256 of the body. A body the access phase could not read (Kong gave nil) is marked unbound; the listener answers
those with 413 whatever they contain.

Several processes (``kong/workers.py``) share one secret and one issuer, and each has a target of its own: the
issuer field is ``<issuer>-<target>``, so the MAC covers the process the access phase sent the request to, and
a process refuses a ticket minted for another one. Each process remembers the nonces it consumed, so single use
stays exact without any state shared between processes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass

HEADER = "X-LLM-Gateway-Ticket"
VERSION = "v2"
UNBOUND = "-"


class TicketError(Exception):
    """The ticket is malformed, forged, expired, replayed, or bound to another request."""


class RetryableTicket(TicketError):
    """Not the client's doing, and a retry goes through: answered as retryable, unlike a ticket that is
    present and wrong."""


class MissingTicket(RetryableTicket):
    """No ticket at all. Kong fails open: a request whose access-phase call could not reach the plugin server
    (while it restarts) is proxied here without one."""


class PredecessorTicket(RetryableTicket):
    """Minted by the plugin server this one replaced (``kong reload``): a request Kong's old workers admitted
    reached the new listener in the moment of the hand-over. Its MAC cannot be checked here."""


@dataclass(frozen=True)
class Claims:
    """What a verified ticket vouches for."""

    config_key: str
    consumer_id: str
    consumer_username: str
    body_bound: bool


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


class TicketBook:
    """Mints and checks tickets. Born in the master before any worker exists, which inherits it by fork (the
    secret never leaves memory: not on disk, not in argv or the environment); each process then sets its own
    ``target``."""

    def __init__(self, ttl_seconds: float = 30.0, secret: bytes | None = None,
                 predecessors: frozenset[str] = frozenset()) -> None:
        self.ttl = ttl_seconds
        self._secret = secret or secrets.token_bytes(32)
        self.issuer = secrets.token_hex(4)  # names this plugin server's tickets, all its processes (not a secret)
        self.target = secrets.token_hex(4)  # names this process among them (a worker gets a fresh one at birth)
        self.predecessors = predecessors  # issuers of the plugin servers this one replaced
        self._used: set[str] = set()
        self._used_order: deque[tuple[float, str]] = deque()

    def _mac(self, payload: str, body_digest: str) -> str:
        mac = hmac.new(self._secret, f"{payload}|{body_digest}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def mint(self, config_key: str, body: bytes | None, consumer: dict | None, target: str | None = None) -> str:
        """A ticket for this request; ``body`` is None when the access phase could not read it (too large);
        ``target`` names the process that will serve it (default: this one)."""
        consumer = consumer or {}
        expires = str(int((time.time() + self.ttl) * 1000))  # ms: no "." inside a "."-separated ticket
        fields = [VERSION, config_key, secrets.token_urlsafe(12), expires,
                  _b64(str(consumer.get("id") or "")), _b64(str(consumer.get("username") or "")),
                  "b" if body is not None else "u", f"{self.issuer}-{target or self.target}"]
        payload = ".".join(fields)
        digest = hashlib.sha256(body).hexdigest() if body is not None else UNBOUND
        return f"{payload}.{self._mac(payload, digest)}"

    def verify(self, ticket: str | None, body: bytes) -> Claims:
        """Check a ticket against the body received; consumes it (single use)."""
        if not ticket:
            raise MissingTicket("missing ticket")
        parts = ticket.split(".")
        if len(parts) != 9 or parts[0] != VERSION or parts[6] not in ("b", "u"):
            raise TicketError("malformed ticket")
        issuer, _, target = parts[7].partition("-")  # a predecessor of an older release has no target
        if issuer != self.issuer:
            if issuer in self.predecessors:
                raise PredecessorTicket("ticket of the previous plugin server")
            raise TicketError("ticket of another issuer")
        payload, mac = ".".join(parts[:8]), parts[8]
        digest = hashlib.sha256(body).hexdigest() if parts[6] == "b" else UNBOUND
        if not hmac.compare_digest(mac, self._mac(payload, digest)):
            raise TicketError("ticket does not match this request")
        now = time.time()
        if not parts[3].isdigit():
            raise TicketError("malformed ticket")
        expires = int(parts[3]) / 1000
        if expires < now:
            raise TicketError("expired ticket")
        if target != self.target:  # before the nonce: the process it was minted for may still be served it
            raise TicketError("ticket minted for another process")
        self._forget_expired(now)
        nonce = parts[2]
        if nonce in self._used:
            raise TicketError("ticket already used")
        self._used.add(nonce)
        self._used_order.append((expires, nonce))
        return Claims(config_key=parts[1], consumer_id=_unb64(parts[4]), consumer_username=_unb64(parts[5]),
                      body_bound=parts[6] == "b")

    def _forget_expired(self, now: float) -> None:
        """Nonces only need remembering until their ticket would have expired anyway."""
        while self._used_order and self._used_order[0][0] < now:
            self._used.discard(self._used_order.popleft()[1])
