"""The Kong-facing shell: the plugin's phase handlers, bound to the PDK. Everything else is plain Python.

The access phase only proves that a request went through Kong (see ``ticket.py``): three PDK calls, four RPC
round trips, and Kong then proxies the untouched request to the plugin server's loopback listener, which does
the LLM work and streams its answer back through Kong. There is deliberately no ``response`` phase: it would
make Kong buffer the whole upstream response, streams included.
"""

from __future__ import annotations

from typing import Any

from llm_gateway import ticket
from llm_gateway.config import parse_config
from llm_gateway.providers import check_model
from llm_gateway.rpc_server import PDK
from llm_gateway.runtime import Runtime


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
        # 0 = "read it whatever its size", including a body nginx spooled to a file (over
        # client_body_buffer_size). Any limit Kong could refuse would make get_raw_body return nil, which Kong
        # 3.9 cannot even pack into the step (mp_rpc.lua fix_raw): a 500. The route's max_body_bytes is the
        # listener's 413; nginx's client_max_body_size is the hard cap in front of all this.
        body = await kong.request.get_raw_body(0)
        if isinstance(body, str):
            body = body.encode()
        consumer = await kong.client.get_consumer()
        minted = self.runtime.tickets.mint(self.config.key, body, consumer)
        await kong.service.request.set_header(ticket.HEADER, minted)

    def close(self) -> None:
        self.runtime.registry.release(self.config.key)
