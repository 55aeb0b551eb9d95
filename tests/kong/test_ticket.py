"""The hand-off ticket as plain Python: what it binds, and what a reload from an older release sends."""

from __future__ import annotations

import pytest

from llm_gateway.kong.ticket import MissingTicket, PredecessorTicket, TicketBook, TicketError

ALICE = {"id": "c-alice", "username": "alice"}


def test_a_ticket_vouches_for_its_config_and_consumer_once() -> None:
    book = TicketBook()
    minted = book.mint("cfg1", ALICE)
    claims = book.verify(minted)
    assert (claims.config_key, claims.consumer_id, claims.consumer_username) == ("cfg1", "c-alice", "alice")
    with pytest.raises(TicketError, match="already used"):
        book.verify(minted)


def _swap(ticket: str, index: int, value: str) -> str:
    parts = ticket.split(".")
    parts[index] = value
    return ".".join(parts)


@pytest.mark.parametrize(("index", "value"), [(1, "cfg2"), (4, "Ym9i"), (5, "Ym9i"), (3, "99999999999999")])
def test_what_the_client_could_choose_is_under_the_mac(index: int, value: str) -> None:
    """Config (the route's models), consumer id and name (billing, budgets, model_access), expiry."""
    book = TicketBook()
    with pytest.raises(TicketError, match="does not match"):
        book.verify(_swap(book.mint("cfg1", ALICE), index, value))


def test_a_ticket_for_another_process_or_issuer_is_refused() -> None:
    book = TicketBook()
    minted = book.mint("cfg1", ALICE, target="deadbeef")
    with pytest.raises(TicketError, match="another process"):
        book.verify(minted)
    other = TicketBook()
    with pytest.raises(TicketError, match="another issuer"):
        book.verify(other.mint("cfg1", ALICE))


def test_a_predecessors_ticket_is_retryable_in_both_formats() -> None:
    """kong reload hands over to a new server; an older release minted v2 tickets (9 fields, a body digest)."""
    old = TicketBook()
    new = TicketBook(predecessors=frozenset({old.issuer}))
    with pytest.raises(PredecessorTicket):
        new.verify(old.mint("cfg1", ALICE))
    legacy = f"v2.cfg1.nonce.1.YQ.YQ.b.{old.issuer}-{old.target}.mac"
    with pytest.raises(PredecessorTicket):
        new.verify(legacy)
    with pytest.raises(TicketError, match="malformed"):  # a v2 of nobody known is no bypass
        new.verify(f"v2.cfg1.nonce.1.YQ.YQ.b.feedface-{old.target}.mac")
    with pytest.raises(MissingTicket):
        new.verify("")
