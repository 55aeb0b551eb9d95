"""Routing strategies: the order each gives is a permutation of the candidates, follows its rule, and spreads
ties and weights as the statistics say it should (seeded, so every run draws the same numbers)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest

from llm_gateway.routing.strategies import STRATEGIES, Candidate, LatencyTracker, blended_price, order

DRAWS = 20_000


def cands(*specs: tuple[str, float] | str, price: Mapping[str, float | None] | None = None) -> list[Candidate]:
    """Candidates in kong.yml order: a bare id (weight 1) or (id, weight)."""
    out = []
    for position, spec in enumerate(specs):
        id_, weight = (spec, 1.0) if isinstance(spec, str) else spec
        out.append(Candidate(id=id_, position=position, weight=weight, price=(price or {}).get(id_)))
    return out


def ranked(strategy: str, candidates: Sequence[Candidate], rng: random.Random, *,
           in_flight: Mapping[str, int] | None = None, latency: LatencyTracker | None = None,
           buffer: float = 0.1) -> list[str]:
    result = order(strategy, candidates, in_flight=in_flight or {}, latency=latency or LatencyTracker(), rng=rng,
                   latency_buffer=buffer)
    return [c.id for c in result]


def first_picks(strategy: str, candidates: Sequence[Candidate], n: int = DRAWS, *,
                in_flight: Mapping[str, int] | None = None, latency: LatencyTracker | None = None,
                buffer: float = 0.1) -> Counter[str]:
    rng = random.Random(1234)
    return Counter(ranked(strategy, candidates, rng, in_flight=in_flight, latency=latency, buffer=buffer)[0]
                   for _ in range(n))


def tracker(**seconds: float) -> LatencyTracker:
    latency = LatencyTracker()
    for id_, value in seconds.items():
        latency.observe(id_, value)
    return latency


# --------------------------------------------------------------------------------------------------------------
# weighted
# --------------------------------------------------------------------------------------------------------------

def test_weighted_first_pick_follows_the_weights() -> None:
    picks = first_picks("weighted", cands(("heavy", 3.0), ("light", 1.0)))
    assert abs(picks["heavy"] / DRAWS - 0.75) < 0.02, picks


def test_weighted_samples_without_replacement() -> None:
    """Weights 2:1:1: the first pick is 50/25/25; after the heavy one, the other two split the second place
    evenly; a light one first leaves the heavy one twice as likely as the other light one second."""
    rng = random.Random(99)
    orders = Counter(tuple(ranked("weighted", cands(("a", 2.0), "b", "c"), rng)) for _ in range(DRAWS))
    first: Counter[str] = Counter()
    for ids, count in orders.items():
        first[ids[0]] += count
    assert abs(first["a"] / DRAWS - 0.5) < 0.02 and abs(first["b"] / DRAWS - 0.25) < 0.02, first
    after_b = orders[("b", "a", "c")] / (orders[("b", "a", "c")] + orders[("b", "c", "a")])
    assert abs(after_b - 2 / 3) < 0.03, orders
    after_a = orders[("a", "b", "c")] / (orders[("a", "b", "c")] + orders[("a", "c", "b")])
    assert abs(after_a - 0.5) < 0.03, orders


def test_weighted_with_equal_weights_is_uniform() -> None:
    picks = first_picks("weighted", cands("a", "b", "c", "d"))
    assert all(abs(n / DRAWS - 0.25) < 0.02 for n in picks.values()) and len(picks) == 4, picks


def test_a_zero_weight_goes_last_instead_of_crashing() -> None:
    rng = random.Random(5)
    for _ in range(200):
        assert ranked("weighted", cands("a", ("off", 0.0), "b"), rng)[-1] == "off"


# --------------------------------------------------------------------------------------------------------------
# least-busy
# --------------------------------------------------------------------------------------------------------------

def test_least_busy_puts_the_idle_one_first() -> None:
    rng = random.Random(1)
    for _ in range(100):
        assert ranked("least-busy", cands("a", "b", "c"), rng, in_flight={"a": 3, "c": 1}) == ["b", "c", "a"]


def test_least_busy_spreads_ties() -> None:
    picks = first_picks("least-busy", cands("a", "b", "busy"), in_flight={"a": 1, "b": 1, "busy": 4})
    assert set(picks) == {"a", "b"} and abs(picks["a"] / DRAWS - 0.5) < 0.02, picks
    rng = random.Random(3)
    assert all(ranked("least-busy", cands("a", "b", "busy"), rng, in_flight={"busy": 4})[-1] == "busy"
               for _ in range(100))


# --------------------------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------------------------

def test_latency_prefers_the_fast_deployment() -> None:
    latency = tracker(slow=1.2, fast=0.3, middle=0.6)
    rng = random.Random(2)
    for _ in range(100):
        assert ranked("latency", cands("slow", "fast", "middle"), rng, latency=latency) == ["fast", "middle", "slow"]


def test_latency_spreads_near_ties_within_the_buffer() -> None:
    latency = tracker(a=1.00, b=1.05, c=1.30)  # b within 10% of a; c is not
    picks = first_picks("latency", cands("a", "b", "c"), latency=latency)
    assert set(picks) == {"a", "b"} and abs(picks["a"] / DRAWS - 0.5) < 0.02, picks
    rng = random.Random(4)
    assert all(ranked("latency", cands("a", "b", "c"), rng, latency=latency)[-1] == "c" for _ in range(100))


def test_latency_buffer_zero_is_strict() -> None:
    latency = tracker(a=1.00, b=1.05)
    assert first_picks("latency", cands("b", "a"), n=200, latency=latency, buffer=0.0) == {"a": 200}


def test_latency_explores_an_unmeasured_deployment_first() -> None:
    latency = tracker(fast=0.1, slow=2.0)
    rng = random.Random(6)
    assert ranked("latency", cands("fast", "slow", "new"), rng, latency=latency) == ["new", "fast", "slow"]
    latency.observe("new", 5.0)  # measured now: it takes its place by speed
    assert ranked("latency", cands("fast", "slow", "new"), rng, latency=latency) == ["fast", "slow", "new"]


def test_latency_explores_once_while_the_probe_is_in_flight() -> None:
    """An unmeasured deployment already serving a request waits behind the fastest group rather than taking
    every concurrent request until its first answer."""
    latency = tracker(fast=0.1, slow=2.0)
    rng = random.Random(7)
    result = ranked("latency", cands("fast", "slow", "new"), rng, latency=latency, in_flight={"new": 1})
    assert result == ["fast", "new", "slow"]


def test_latency_with_nothing_measured_spreads_the_exploration() -> None:
    picks = first_picks("latency", cands("a", "b"))
    assert abs(picks["a"] / DRAWS - 0.5) < 0.02, picks


# --------------------------------------------------------------------------------------------------------------
# cost, priority
# --------------------------------------------------------------------------------------------------------------

def test_cost_picks_the_cheap_one_and_puts_unknown_prices_last() -> None:
    prices = {"dear": 3e-5, "unknown": None, "cheap": 2e-7, "mid": 1e-6}
    rng = random.Random(8)
    for _ in range(100):
        assert ranked("cost", cands("dear", "unknown", "cheap", "mid", price=prices), rng) == [
            "cheap", "mid", "dear", "unknown"]


def test_cost_spreads_ties_and_counts_nan_as_unknown() -> None:
    prices = {"a": 1e-6, "b": 1e-6, "nan": math.nan, "c": 2e-6}
    picks = first_picks("cost", cands("a", "b", "nan", "c", price=prices))
    assert set(picks) == {"a", "b"} and abs(picks["a"] / DRAWS - 0.5) < 0.02, picks
    rng = random.Random(9)
    assert all(ranked("cost", cands("a", "b", "nan", "c", price=prices), rng)[-1] == "nan" for _ in range(50))


def test_priority_keeps_kong_yml_order() -> None:
    shuffled = [c for _, c in sorted(enumerate(cands("first", "second", "third")), key=lambda ic: -ic[0])]
    assert ranked("priority", shuffled, random.Random(0)) == ["first", "second", "third"]


# --------------------------------------------------------------------------------------------------------------
# every strategy
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_result_is_a_permutation_of_the_input(strategy: str) -> None:
    rng = random.Random(10)
    for n in range(7):
        candidates = [Candidate(id=f"d{i}", position=i, weight=rng.uniform(0.1, 5),
                                price=rng.choice([None, rng.uniform(1e-7, 1e-5)])) for i in range(n)]
        latency = tracker(**{c.id: rng.uniform(0.05, 2) for c in candidates if rng.random() < 0.7})
        in_flight = {c.id: rng.randint(0, 3) for c in candidates}
        for _ in range(20):
            result = order(strategy, candidates, in_flight=in_flight, latency=latency, rng=rng)
            assert sorted(id(c) for c in result) == sorted(id(c) for c in candidates)  # the same objects


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_given_the_rng(strategy: str) -> None:
    candidates = cands(("a", 2.0), "b", "c", "d", price={"a": 1e-6, "b": 1e-6, "c": 1e-6})
    latency = tracker(a=1.0, b=1.02, c=1.05)

    def run(seed: int) -> list[list[str]]:
        rng = random.Random(seed)
        return [ranked(strategy, candidates, rng, latency=latency, in_flight={"d": 1}) for _ in range(50)]

    assert run(11) == run(11)


def test_an_unknown_strategy_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown routing strategy"):
        order("fastest", cands("a"), in_flight={}, latency=LatencyTracker(), rng=random.Random())


# --------------------------------------------------------------------------------------------------------------
# LatencyTracker, blended_price
# --------------------------------------------------------------------------------------------------------------

def test_latency_tracker_is_an_exponential_moving_average() -> None:
    latency = LatencyTracker(alpha=0.5)
    assert latency.get("a") is None
    latency.observe("a", 1.0)
    assert latency.get("a") == 1.0
    latency.observe("a", 3.0)
    assert latency.get("a") == pytest.approx(2.0)
    for bad in (math.nan, math.inf, -1.0):
        latency.observe("a", bad)
    assert latency.get("a") == pytest.approx(2.0)
    with pytest.raises(ValueError):
        LatencyTracker(alpha=0.0)


def test_blended_price_sums_input_and_output() -> None:
    override = {"input_cost_per_token": 1e-6, "output_cost_per_token": 4e-6}
    assert blended_price("openai/my-private-model", override) == pytest.approx(5e-6)
    assert blended_price("openai/my-private-model", None) is None
    assert blended_price("openai/my-private-model", {"input_cost_per_token": 1e-6}) is None


def test_blended_price_reads_litellm_price_map() -> None:
    import litellm

    entry = litellm.model_cost["gpt-4o-mini"]
    expected = entry["input_cost_per_token"] + entry["output_cost_per_token"]
    assert blended_price("gpt-4o-mini", None) == pytest.approx(expected)
    assert blended_price("openai/gpt-4o-mini", None) == pytest.approx(expected)
    assert blended_price("openai/gpt-4o-mini", {"output_cost_per_token": 0.0}) == pytest.approx(
        entry["input_cost_per_token"])
