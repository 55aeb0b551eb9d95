"""Our access phase (body, consumer, one header) written for kong-pdk's stock server: the peer that
``bench/plugin_server_events.py`` measures our own server against.

Run as Kong would: ``python bench/stock_pdk_plugin.py -p PREFIX [-g|-m]`` → socket ``PREFIX/stock.sock``.
"""

from __future__ import annotations

from typing import Any

Schema = ({"note": {"type": "string"}},)
version = "0.1.0"
priority = 780


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def access(self, kong: Any) -> None:
        kong.request.get_raw_body(1048576)
        kong.client.get_consumer()
        kong.service.request.set_header("X-LLM-Gateway-Ticket", "t")


if __name__ == "__main__":
    from kong_pdk.cli import start_dedicated_server

    start_dedicated_server("stock", Plugin, version, priority, Schema)
