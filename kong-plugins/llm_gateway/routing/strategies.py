"""The order in which a model alias's deployments are tried: the routing strategies.

``order`` returns every candidate, best first; the router skips the cooling and capped ones itself and walks
down the list on failures, so a strategy only ranks and never filters. It runs on every request attempt, so it
is plain Python over a handful of candidates (a microsecond or two), with randomness only from the ``rng`` it
is given: the same rng state gives the same order, which is what the tests rely on.

* ``weighted``: weighted random sampling without replacement (Efraimidis–Spirakis keys ``u ** (1 / w)``): the
  first pick is proportional to weight, and so is each next pick among the rest.
* ``least-busy``: fewest requests in flight (across nodes, as the router's shared state counts them) first;
  ties in random order, so idle deployments share the load.
* ``latency``: lowest moving average first, with everything within ``latency_buffer`` (relative) of the
  fastest shuffled among itself, as LiteLLM's ``lowest_latency_buffer``: a 3% difference is noise, and
  sending every request to the one that happens to be ahead would make it slow. A deployment not measured yet
  goes first, once: while that probe is in flight it waits behind the fastest group instead, so a new (or
  slow) deployment does not take every concurrent request before its first answer comes back.
* ``cost``: lowest blended price per token first, unknown prices last, ties in random order.
* ``priority``: kong.yml order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter

STRATEGIES = ("weighted", "least-busy", "latency", "cost", "priority")

#: a weight that is not positive (or not a number) still gets a key: such a deployment goes last, not to a crash
_MIN_WEIGHT = 1e-9


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str  # the key the router's shared state and LatencyTracker use, e.g. "chat-default#0:openai/gpt-4o-mini"
    position: int  # order in kong.yml: the priority strategy's order, and the final tie-break
    weight: float = 1.0  # > 0
    price: float | None = None  # USD per token, input + output summed (None: unknown)


class LatencyTracker:
    """Per-deployment exponential moving average of seconds (to first byte for streams, whole answer for JSON).

    Local to the process on purpose: each node measures its own network path to the provider. ``alpha`` is the
    weight of the newest observation: 0.3 forgets a slow spell within a handful of requests without letting one
    outlier reorder everything."""

    __slots__ = ("_alpha", "_avg")

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], not {alpha!r}")
        self._alpha = alpha
        self._avg: dict[str, float] = {}

    def observe(self, id: str, seconds: float) -> None:
        """Fold one measurement in. A negative or non-finite one is dropped: a NaN would poison the average for
        good, and a clock step is no evidence about the deployment."""
        if not (seconds >= 0.0 and seconds != math.inf):  # also False for NaN
            return
        old = self._avg.get(id)
        self._avg[id] = seconds if old is None else old + self._alpha * (seconds - old)

    def get(self, id: str) -> float | None:
        """The moving average, or None when nothing was measured yet (the latency strategy explores it)."""
        return self._avg.get(id)


_Order = Callable[[Sequence[Candidate], Mapping[str, int], LatencyTracker, random.Random, float], list[Candidate]]


def _weighted(candidates: Sequence[Candidate], in_flight: Mapping[str, int], latency: LatencyTracker,
              rng: random.Random, buffer: float) -> list[Candidate]:
    draw = rng.random
    keyed = [(draw() ** (1.0 / (c.weight if c.weight > 0.0 else _MIN_WEIGHT)), i) for i, c in enumerate(candidates)]
    keyed.sort(key=itemgetter(0), reverse=True)
    return [candidates[i] for _, i in keyed]


def _least_busy(candidates: Sequence[Candidate], in_flight: Mapping[str, int], latency: LatencyTracker,
                rng: random.Random, buffer: float) -> list[Candidate]:
    draw = rng.random
    return sorted(candidates, key=lambda c: (in_flight.get(c.id, 0), draw()))


def _latency(candidates: Sequence[Candidate], in_flight: Mapping[str, int], latency: LatencyTracker,
             rng: random.Random, buffer: float) -> list[Candidate]:
    explore: list[Candidate] = []  # never measured, nobody probing it yet: first
    probing: list[Candidate] = []  # never measured, a probe is in flight: after the fastest group
    measured: list[tuple[float, int, Candidate]] = []
    for c in candidates:
        avg = latency.get(c.id)
        if avg is not None:
            measured.append((avg, c.position, c))
        elif in_flight.get(c.id, 0) > 0:
            probing.append(c)
        else:
            explore.append(c)
    if len(explore) > 1:
        rng.shuffle(explore)
    if len(probing) > 1:
        rng.shuffle(probing)
    if not measured:
        return explore + probing
    measured.sort(key=itemgetter(0, 1))
    limit = measured[0][0] * (1.0 + max(buffer, 0.0))
    split = 1
    while split < len(measured) and measured[split][0] <= limit:
        split += 1
    near = [c for _, _, c in measured[:split]]
    if split > 1:
        rng.shuffle(near)
    return explore + near + probing + [c for _, _, c in measured[split:]]


def _cost(candidates: Sequence[Candidate], in_flight: Mapping[str, int], latency: LatencyTracker,
          rng: random.Random, buffer: float) -> list[Candidate]:
    draw = rng.random

    def key(c: Candidate) -> tuple[bool, float, float]:
        price = c.price
        if price is None or price != price:  # unknown (or NaN): after every known price
            return (True, 0.0, draw())
        return (False, price, draw())

    return sorted(candidates, key=key)


def _priority(candidates: Sequence[Candidate], in_flight: Mapping[str, int], latency: LatencyTracker,
              rng: random.Random, buffer: float) -> list[Candidate]:
    return sorted(candidates, key=attrgetter("position"))


_ORDERS: dict[str, _Order] = {"weighted": _weighted, "least-busy": _least_busy, "latency": _latency,
                              "cost": _cost, "priority": _priority}


def order(strategy: str, candidates: Sequence[Candidate], *, in_flight: Mapping[str, int],
          latency: LatencyTracker, rng: random.Random, latency_buffer: float = 0.1) -> list[Candidate]:
    """All ``candidates``, best first, by ``strategy`` (one of STRATEGIES). ``in_flight`` counts requests in
    flight by candidate id (absent: none); ``latency_buffer`` is relative (0.1: within 10% of the fastest)."""
    ranked = _ORDERS.get(strategy)
    if ranked is None:
        raise ValueError(f"unknown routing strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if len(candidates) <= 1:
        return list(candidates)
    return ranked(candidates, in_flight, latency, rng, latency_buffer)


def blended_price(model: str, override: Mapping[str, float] | None) -> float | None:
    """Input plus output USD per token, for the cost strategy: ``override``'s prices where given, else LiteLLM's
    local price map, found exactly as the usage records price the call (``accounting.prices_for``), so the
    strategy ranks by what the gateway will bill. None when either price is unknown. Called at config load,
    not per request."""
    from llm_gateway.accounting.prices import (
        prices_for,  # imports LiteLLM: kept out of this per-request module's import
    )

    prices = prices_for(model, override)
    return None if prices is None else prices.input_per_token + prices.output_per_token
