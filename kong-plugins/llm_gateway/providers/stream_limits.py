"""What one stream may take, enforced between the provider's events and the client: a maximum duration, a
maximum silence, and the completion tokens its budget reservation granted.

The listener relays ``guard(events)`` instead of ``events``; when a limit is reached the guard raises a
``GatewayError`` and the listener ends the stream with that error as an SSE event, records what was received
and marks it truncated. The provider's own timeouts do not cover these: a provider that sends an SSE comment
every half second keeps its socket busy forever, and one that ignores ``max_tokens`` spends without end.

Counting the completion costs nothing per event: the ``Usage`` the provider reader fills keeps a character
count (and only a bounded prefix of the text); a real token count runs only at checkpoints, once the text
could hold the granted tokens (at least one character per token), and again each time it could hold what was
left, so a stream of n granted tokens is counted O(log n) times, each over bounded text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from llm_gateway.errors import GatewayError
from llm_gateway.providers.openai_compatible import Usage


def idle_timeout(seconds: float) -> GatewayError:
    return GatewayError(504, f"The provider sent nothing for {seconds:g} s; the gateway ended the stream.",
                        type="server_error", code="stream_idle_timeout")


def max_duration(seconds: float) -> GatewayError:
    return GatewayError(504, f"The stream reached this route's limit of {seconds:g} s; the gateway ended it.",
                        type="server_error", code="stream_max_duration")


def reservation_used(tokens: int) -> GatewayError:
    return GatewayError(429, f"The response reached the {tokens} completion tokens its budget reservation "
                             f"allowed; the gateway ended the stream.", type="rate_limit_error",
                        code="budget_reservation_exhausted")


SLACK_TOKENS = 16  # at least this many tokens of estimate error are tolerated over a reservation


class StreamGuard:
    """Limits of one stream. ``completion_tokens`` counts the completion so far (the ledger's estimator);
    ``max_tokens`` None means no reservation bounds it.

    One timer per stream, not one per event (``asyncio.timeout`` per event costs ~7 µs, more than relaying the
    event): each wait for the provider only notes when it began; when the timer fires it re-arms itself at that
    moment plus the idle time, or, when that has passed (or the duration limit), cancels the wait for the
    provider — only that wait, never the write to a slow client — as ``asyncio.timeout`` would."""

    def __init__(self, usage: Usage, *, started: float, max_duration_s: float, idle_s: float,
                 max_tokens: int | None = None, completion_tokens: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.usage, self.clock = usage, clock
        self.max_duration_s, self.idle_s = max_duration_s, idle_s
        self.deadline = started + max_duration_s
        self.max_tokens = max_tokens if completion_tokens is not None else None
        # the provider was sent max_tokens and stops there; the guard's count is an estimate (another tokenizer
        # than the provider's), so it ends a stream only clearly past it: a provider that ignores the limit
        self.ceiling = max_tokens + max(SLACK_TOKENS, max_tokens // 4) if max_tokens is not None else None
        self.completion_tokens = completion_tokens
        self._next_check = max_tokens if max_tokens is not None else 0  # characters
        self.checks = 0  # token counts run (how often the checkpoints fired)
        self._since = clock()  # when the current wait for the provider began
        self._task: asyncio.Task | None = None
        self._waiting = False  # awaiting the provider: the only await the timer may cancel
        self._expired: GatewayError | None = None
        self._timer: asyncio.TimerHandle | None = None

    def _over_reservation(self) -> bool:
        if self.max_tokens is None or self.usage.chars < self._next_check:
            return False
        assert self.completion_tokens is not None
        self.checks += 1
        used = self.completion_tokens()
        assert self.ceiling is not None
        if used > self.ceiling:
            return True
        self._next_check = self.usage.chars + max(1, self.ceiling - used)
        return False

    def _limit(self, now: float) -> GatewayError | None:
        """The limit reached now: the duration at any time, the idle time only while waiting for the provider
        (a client that reads slowly is not the provider's silence)."""
        if now >= self.deadline:
            return max_duration(self.max_duration_s)
        if self._waiting and now - self._since >= self.idle_s:
            return idle_timeout(self.idle_s)
        return None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self.clock()
        when = min(self.deadline, (self._since if self._waiting else now) + self.idle_s)
        # the timer runs on the loop's clock; ours may be another (tests): convert by offset
        self._timer = loop.call_at(max(when, now) + loop.time() - now, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._task is None or self._task.done():
            return  # the request is over (its stream abandoned): nothing to watch
        expired = self._limit(self.clock())
        if expired is not None and self._waiting:
            self._expired = expired
            self._task.cancel()
            return
        if expired is not None:  # past the duration while the client reads: the next wait ends it
            return
        self._arm(loop)

    async def guard(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        iterator = events.__aiter__()
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._arm(loop)
        try:
            while True:
                now = self.clock()
                if now >= self.deadline:
                    raise max_duration(self.max_duration_s)
                self._since, self._waiting = now, True
                if self._timer is None:
                    self._arm(loop)
                try:
                    event = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if self._expired is None:
                        raise  # a real cancellation (the request's), not our timer
                    if self._task is not None:
                        self._task.uncancel()
                    raise self._expired from None
                finally:
                    self._waiting = False
                if self._over_reservation():
                    raise reservation_used(self.max_tokens or 0)
                yield event
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
