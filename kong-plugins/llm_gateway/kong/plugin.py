"""The Kong-facing shell: the plugin's phase handlers, bound to the PDK. Everything else is plain Python.

The access phase only proves that a request went through Kong (see ``kong/ticket.py``): two PDK calls, three RPC
round trips (plus one on an instance's first request, to learn the Service's read timeout), and Kong then
proxies the untouched request to the plugin server's loopback listener, which does the LLM work and streams
its answer back through Kong. With several processes (``kong/workers.py``) it picks the one to serve the
request, and when that is a worker one more PDK call, ``kong.service.set_target``, sends it there. There is
deliberately no ``response`` phase: it would make Kong buffer the whole upstream response, streams included.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from llm_gateway.accounting.tokens import warm_up
from llm_gateway.config import GatewayConfig, parse_config
from llm_gateway.kong import ticket
from llm_gateway.kong.rpc_server import PDK
from llm_gateway.providers.upstream import check_model
from llm_gateway.runtime import Runtime

if TYPE_CHECKING:
    from llm_gateway.kong.workers import ProcessPool


class LLMGatewayPlugin:
    """One instance per (plugin config, nginx worker); equal configs share one parsed GatewayConfig."""

    def __init__(self, raw_config: dict[str, Any], runtime: Runtime, pool: ProcessPool | None = None) -> None:
        parsed = parse_config(raw_config)
        for alias in parsed.models.values():
            for deployment in alias.deployments:
                check_model(deployment.model)
        self.runtime = runtime
        self.pool = pool  # the master's workers; None in a worker's mirror of the instance and with one process
        self.config = runtime.registry.acquire(parsed)
        self._timeouts_known = False
        runtime.watch(self.config)  # sweeps budget leases a crashed node left (accounting/leases.py)
        if self.config.budgets and self.config is parsed:
            _load_tokenizers(self.config)

    async def access(self, kong: PDK) -> None:
        consumer = await kong.client.get_consumer()
        if not self._timeouts_known:  # once per instance: the Service's timeouts change only with the config
            self._timeouts_known = True
            service = await kong.router.get_service()
            read_timeout = service.get("read_timeout") if isinstance(service, dict) else None
            if isinstance(read_timeout, int | float) and not isinstance(read_timeout, bool) and read_timeout > 0:
                self.runtime.note_kong_read_timeout(self.config, read_timeout / 1000)
                if self.pool is not None:
                    self.pool.read_timeout(self.config.key, read_timeout / 1000)
        target = self.pool.pick(self.config, consumer) if self.pool is not None else None
        if target is not None:  # a worker; the master is the Service's own URL
            await kong.service.set_target(target.host, target.port)
        minted = self.runtime.tickets.mint(self.config.key, consumer, target.token if target else None)
        await kong.service.request.set_header(ticket.HEADER, minted)

    def close(self) -> None:
        self.runtime.registry.release(self.config.key)


def _load_tokenizers(config: GatewayConfig) -> None:
    """Budget admission counts prompt tokens with LiteLLM's tokenizers: load the ones this config needs in a
    thread now, so no request waits for it (0.3-0.5 s each). Routes without budgets never load them (40-70 MB
    each): they count tokens only when a provider reports none."""
    models = tuple({d.model.partition("/")[2] for a in config.models.values() for d in a.deployments})
    try:
        asyncio.get_running_loop().run_in_executor(None, warm_up, models)
    except RuntimeError:  # no event loop (a config checked outside the server): nothing to warm
        pass
