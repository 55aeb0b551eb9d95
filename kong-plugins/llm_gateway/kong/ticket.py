"""Hand-off tickets: proof that a request reaching the loopback listener went through Kong's access phase.

Kong fails open (a plugin-server error lets the request through to the Service), and anything on the host can
reach a loopback port, so the listener trusts nothing but a ticket: an HMAC, keyed by a secret born in this
process, over the config the request was admitted under, a single-use nonce, an expiry, the consumer Kong
authenticated, and the process it is for.

The body is deliberately not bound (v2 bound its SHA-256): reading it in the access phase was one RPC round trip
and a copy of every body through MessagePack on both sides of the socket, and it protected nothing a single-use
ticket does not. A ticket reaches the listener only inside the request Kong proxies; replaying it fails (single
use), and whoever could lift one off the loopback in flight and race Kong with another body can read every
request on the host anyway. What the ticket must pin is what the client could otherwise choose: the consumer
(billing, budgets, ``model_access``) and the config (the route's models). docs/architecture.md, "The hand-off
ticket", has the decision.

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
VERSION = "v3"
LEGACY_VERSIONS = frozenset({"v2"})  # a predecessor's format (kong reload from an older release)


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

    def _mac(self, payload: str) -> str:
        mac = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def mint(self, config_key: str, consumer: dict | None, target: str | None = None) -> str:
        """A ticket for this request; ``target`` names the process that will serve it (default: this one)."""
        consumer = consumer or {}
        expires = str(int((time.time() + self.ttl) * 1000))  # ms: no "." inside a "."-separated ticket
        fields = [VERSION, config_key, secrets.token_urlsafe(12), expires,
                  _b64(str(consumer.get("id") or "")), _b64(str(consumer.get("username") or "")),
                  f"{self.issuer}-{target or self.target}"]
        payload = ".".join(fields)
        return f"{payload}.{self._mac(payload)}"

    def verify(self, ticket: str | None) -> Claims:
        """Check a ticket; consumes it (single use)."""
        if not ticket:
            raise MissingTicket("missing ticket")
        parts = ticket.split(".")
        if parts[0] in LEGACY_VERSIONS and len(parts) == 9 and parts[7].partition("-")[0] in self.predecessors:
            raise PredecessorTicket("ticket of the previous plugin server")
        if len(parts) != 8 or parts[0] != VERSION:
            raise TicketError("malformed ticket")
        issuer, _, target = parts[6].partition("-")
        if issuer != self.issuer:
            if issuer in self.predecessors:
                raise PredecessorTicket("ticket of the previous plugin server")
            raise TicketError("ticket of another issuer")
        payload, mac = ".".join(parts[:7]), parts[7]
        if not hmac.compare_digest(mac, self._mac(payload)):
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
        return Claims(config_key=parts[1], consumer_id=_unb64(parts[4]), consumer_username=_unb64(parts[5]))

    def _forget_expired(self, now: float) -> None:
        """Nonces only need remembering until their ticket would have expired anyway."""
        while self._used_order and self._used_order[0][0] < now:
            self._used.discard(self._used_order.popleft()[1])
