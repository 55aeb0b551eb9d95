"""The Kong-facing shell: the plugin's phase handlers, bound to the PDK. Everything else is plain Python.

The access phase only proves that a request went through Kong (see ``ticket.py``): three PDK calls, four RPC
round trips, and Kong then proxies the untouched request to the plugin server's loopback listener, which does
the LLM work and streams its answer back through Kong. There is deliberately no ``response`` phase: it would
make Kong buffer the whole upstream response, streams included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_gateway import ticket
from llm_gateway.config import ConfigRegistry, parse_config
from llm_gateway.providers import check_model
from llm_gateway.rpc_server import PDK


@dataclass
class Runtime:
    """Process-wide state shared by every plugin instance and the listener."""

    registry: ConfigRegistry
    tickets: ticket.TicketBook


class LLMGatewayPlugin:
    """One instance per (plugin config, nginx worker); equal configs share one parsed GatewayConfig."""

    def __init__(self, raw_config: dict[str, Any], runtime: Runtime) -> None:
        parsed = parse_config(raw_config)
        for alias in parsed.models.values():
            for deployment in alias.deployments:
                check_model(deployment.model)
        self.runtime = runtime
        self.config = runtime.registry.acquire(parsed)

    async def access(self, kong: PDK) -> None:
        # max_body_bytes lets Kong read a body spooled to a file (over client_body_buffer_size) up to the
        # limit; over it, Kong answers nil and the ticket is marked unbound, which the listener answers 413.
        body = await kong.request.get_raw_body(self.config.max_body_bytes)
        if isinstance(body, str):
            body = body.encode()
        consumer = await kong.client.get_consumer()
        minted = self.runtime.tickets.mint(self.config.key, body, consumer)
        await kong.service.request.set_header(ticket.HEADER, minted)

    def close(self) -> None:
        self.runtime.registry.release(self.config.key)
