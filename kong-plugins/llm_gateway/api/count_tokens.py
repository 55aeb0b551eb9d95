"""``POST /v1/messages/count_tokens``: the input tokens of a Messages prompt on the model an alias names, answered
by the gateway itself (nothing is charged, no deployment's health is at stake), in Anthropic's shape.

The body is a Messages request without ``max_tokens`` (``api.messages.parse_prompt``); the alias must exist
(404 ``not_found_error``) and the consumer may have to be allowed it (403 ``permission_error``). The count is
the first deployment's (``providers.token_count``): what a request to the alias would be charged for, unless a
fallback serves it.
"""

from __future__ import annotations

import json

from llm_gateway.api.base import ANTHROPIC_ERRORS, Admitted
from llm_gateway.api.messages import parse_prompt
from llm_gateway.config import Alias, GatewayConfig
from llm_gateway.errors import GatewayError
from llm_gateway.providers import token_count

ECHO_LIMIT = 256


def _echo(value: str) -> str:
    return value if len(value) <= ECHO_LIMIT else value[:ECHO_LIMIT] + f"… ({len(value)} characters)"


def _serving(config: GatewayConfig, alias: Alias) -> Alias:
    """The alias whose deployments would serve: a routing alias counts on its weak side (the cheaper guess)."""
    seen = {alias.name}
    while alias.complexity is not None and alias.complexity.weak in config.models and alias.complexity.weak not in seen:
        alias = config.models[alias.complexity.weak]
        seen.add(alias.name)
    return alias


class CountTokensEndpoint:
    """The ``DirectEndpoint`` answering ``{"input_tokens": N}``."""

    name = "messages.count_tokens"
    method = "POST"
    path = "/v1/messages/count_tokens"
    errors = ANTHROPIC_ERRORS

    async def answer(self, request: Admitted) -> bytes:
        model, _, params = parse_prompt(request.body, count_only=True)
        alias = request.config.models.get(model)
        if alias is None:
            raise GatewayError(404, f"The model '{_echo(model)}' does not exist on this route.", param="model",
                               code="model_not_found")
        if not request.may_use(alias.name):
            raise GatewayError(403, f"This consumer may not use the model '{_echo(model)}'.",
                               type="permission_error", param="model", code="model_not_allowed")
        serving = _serving(request.config, alias)
        if not serving.deployments:
            raise GatewayError(404, f"The model '{_echo(model)}' has no deployment to count for.", param="model",
                               code="model_not_found")
        tokens, _ = await token_count.count_tokens(serving.deployments[0], params)
        return json.dumps({"input_tokens": tokens}, separators=(",", ":")).encode()


ENDPOINT = CountTokensEndpoint()
