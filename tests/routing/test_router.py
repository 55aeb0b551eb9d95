"""The router on its own, with a scripted call in place of the provider: backoff and Retry-After, the deadline,
deployment faults, cooldowns, the last healthy deployment, and the 503 when everything is cooling."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest

from llm_gateway.config import Alias, Deployment, GatewayConfig, RoutingSettings
from llm_gateway.errors import GatewayError
from llm_gateway.routing.router import Router
from llm_gateway.routing.state import CooldownPolicy
from llm_gateway.routing.state_stores.memory import MemoryRoutingState

RATE_LIMITED = GatewayError(429, "slow down", code="rate_limit_exceeded", headers={"Retry-After": "1"})
DOWN = GatewayError(502, "down", code="provider_error")
BAD_KEY = GatewayError(502, "key", code="provider_auth_error")
BAD_REQUEST = GatewayError(400, "no", code="provider_rejected_request")


def deployment(name: str, **extra: object) -> Deployment:
    return Deployment(model=f"openai/{name}", api_base=None, api_key=None, timeout=5.0, id=name, health_key=name,
                      **extra)  # type: ignore[arg-type]


def config(*aliases: Alias, **routing: object) -> GatewayConfig:
    settings = RoutingSettings(**{"backoff_initial": 0.01, "backoff_max": 2.0, **routing})  # type: ignore[arg-type]
    return GatewayConfig(key="k", models={a.name: a for a in aliases}, max_body_bytes=1024, routing=settings)


def scripted(outcomes: dict[str, list[GatewayError | str]]) -> tuple[Callable[[Deployment], Awaitable[str]], list]:
    """Each deployment answers its outcomes in turn (the last one repeats); calls are logged with times."""
    log: list[tuple[str, float]] = []

    async def call(d: Deployment) -> str:
        log.append((d.id, time.monotonic()))
        script = outcomes[d.id]
        outcome = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(outcome, GatewayError):
            raise outcome
        return outcome

    return call, log


async def route(router: Router, cfg: GatewayConfig, alias: str, call: Callable) -> object:
    return await router.route(cfg, cfg.models[alias], "req-1", call, lambda a, d: None)


async def test_retry_waits_at_least_retry_after_on_the_same_deployment() -> None:
    state = MemoryRoutingState()
    cfg = config(Alias("a", (deployment("only"),)))
    call, log = scripted({"only": [RATE_LIMITED, "ok"]})
    routed = await route(Router(lambda c: state), cfg, "a", call)
    assert routed.result == "ok" and routed.attempts == 2  # type: ignore[attr-defined]
    assert log[1][1] - log[0][1] >= 0.99


async def test_retry_after_longer_than_backoff_max_is_left_to_the_client() -> None:
    cfg = config(Alias("a", (deployment("only"),)), backoff_max=0.5)
    call, log = scripted({"only": [RATE_LIMITED]})
    with pytest.raises(GatewayError) as failed:
        await route(Router(lambda c: MemoryRoutingState()), cfg, "a", call)
    assert failed.value.status == 429 and failed.value.headers["Retry-After"] == "1" and len(log) == 1


async def test_another_deployment_is_tried_at_once_without_backoff() -> None:
    cfg = config(Alias("a", (deployment("x"), deployment("y")), strategy="priority"), backoff_initial=5.0)
    call, _log = scripted({"x": [DOWN], "y": ["ok"]})
    started = time.monotonic()
    routed = await route(Router(lambda c: MemoryRoutingState()), cfg, "a", call)
    assert routed.deployment.id == "y" and time.monotonic() - started < 1  # type: ignore[attr-defined]


async def test_a_deployment_with_a_bad_key_is_not_retried() -> None:
    cfg = config(Alias("a", (deployment("x"), deployment("y")), strategy="priority"), retries=3)
    call, log = scripted({"x": [BAD_KEY], "y": [DOWN]})
    with pytest.raises(GatewayError):
        await route(Router(lambda c: MemoryRoutingState()), cfg, "a", call)
    assert [d for d, _ in log].count("x") == 1 and [d for d, _ in log].count("y") == 3


async def test_client_errors_are_not_retried_nor_fallen_back() -> None:
    cfg = config(Alias("a", (deployment("x"),), fallbacks=("b",)), Alias("b", (deployment("y"),)))
    call, log = scripted({"x": [BAD_REQUEST], "y": ["ok"]})
    with pytest.raises(GatewayError) as failed:
        await route(Router(lambda c: MemoryRoutingState()), cfg, "a", call)
    assert failed.value.status == 400 and len(log) == 1


async def test_the_deadline_bounds_every_attempt_and_backoff() -> None:
    cfg = config(Alias("a", (deployment("x"),)), retries=10, deadline=0.3, backoff_initial=0.2, backoff_max=0.2)
    call, log = scripted({"x": [DOWN]})
    started = time.monotonic()
    with pytest.raises(GatewayError):
        await route(Router(lambda c: MemoryRoutingState()), cfg, "a", call)
    assert time.monotonic() - started < 0.5 and len(log) <= 3


async def test_attempt_timeouts_shrink_to_the_deadline() -> None:
    cfg = config(Alias("a", (deployment("x"),)), deadline=2.0)
    seen: list[float] = []

    async def call(d: Deployment) -> str:
        seen.append(d.timeout)
        return "ok"

    await route(Router(lambda c: MemoryRoutingState()), cfg, "a", call)
    assert seen and seen[0] <= 2.0


async def test_a_failing_deployment_cools_and_is_skipped_while_the_other_serves() -> None:
    state = MemoryRoutingState()
    cooled: list[tuple[str, str]] = []
    router = Router(lambda c: state, on_cooldown=lambda alias, d: cooled.append((alias, d)))
    cfg = config(Alias("a", (deployment("x"), deployment("y")), strategy="priority"),
                 cooldown=CooldownPolicy(allowed_fails=2, cooldown_s=30))
    call, log = scripted({"x": [DOWN], "y": ["ok"]})
    for _ in range(4):
        await route(router, cfg, "a", call)
    assert cooled == [("a", "x")]
    assert [d for d, _ in log].count("x") == 2  # cooled after its second failure, then left alone


async def test_the_last_healthy_deployment_is_never_cooled_by_default() -> None:
    state = MemoryRoutingState()
    cfg = config(Alias("a", (deployment("x"),)), retries=0, cooldown=CooldownPolicy(allowed_fails=1))
    call, log = scripted({"x": [DOWN]})
    for _ in range(3):
        with pytest.raises(GatewayError):
            await route(Router(lambda c: state), cfg, "a", call)
    assert len(log) == 3  # still tried: cooling it would turn every request into a 503


async def test_everything_cooling_is_a_503_with_retry_after() -> None:
    state = MemoryRoutingState()
    cfg = config(Alias("a", (deployment("x"),)), retries=0,
                 cooldown=CooldownPolicy(allowed_fails=1, cooldown_s=30, cool_last_healthy=True))
    call, _ = scripted({"x": [DOWN]})
    with pytest.raises(GatewayError):
        await route(Router(lambda c: state), cfg, "a", call)
    with pytest.raises(GatewayError) as failed:
        await route(Router(lambda c: state), cfg, "a", call)
    assert failed.value.status == 503 and failed.value.code == "no_healthy_deployment"
    assert 1 <= int(failed.value.headers["Retry-After"]) <= 30


async def test_rpm_caps_send_traffic_elsewhere() -> None:
    state = MemoryRoutingState()
    cfg = config(Alias("a", (deployment("x", rpm=2), deployment("y")), strategy="priority"))
    call, log = scripted({"x": ["ok"], "y": ["ok"]})
    for _ in range(4):
        routed = await route(Router(lambda c: state), cfg, "a", call)
        await routed.done(10)  # type: ignore[attr-defined]
    assert [d for d, _ in log] == ["x", "x", "y", "y"]


async def test_in_flight_is_counted_until_done() -> None:
    state = MemoryRoutingState()
    cfg = config(Alias("a", (deployment("x"),), strategy="least-busy"))
    call, _ = scripted({"x": ["ok"]})
    routed = await route(Router(lambda c: state), cfg, "a", call)
    assert (await state.snapshot(["x"])).in_flight.get("x") == 1
    await routed.done(5)  # type: ignore[attr-defined]
    assert (await state.snapshot(["x"])).in_flight.get("x", 0) == 0

