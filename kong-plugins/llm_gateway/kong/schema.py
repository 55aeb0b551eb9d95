"""The plugin's Kong schema and the plugin info Kong's ``query_cmd`` expects.

The schema is Kong's Lua schema language written as data (``kong/db/schema/init.lua``): Kong validates every
kong.yml against it at load time, so a bad configuration is refused before a request ever reaches Python.
Validation that Kong's language cannot express (unique alias names, for instance) is repeated in
``config.py``, which is also what turns this data into typed settings.
"""

from __future__ import annotations

from typing import Any

from llm_gateway import PLUGIN_NAME, PLUGIN_PRIORITY, PLUGIN_VERSION

PHASES = ["access"]  # never "response": Kong would then buffer the whole upstream response, streams included

DEPLOYMENT_FIELDS: list[dict[str, Any]] = [
    {"model": {
        "type": "string", "required": True,
        "description": "Provider model in LiteLLM's format, e.g. openai/gpt-4o-mini, anthropic/claude-3-5-haiku-"
                       "latest; demo/<name> is the built-in demo provider.",
    }},
    {"api_base": {"type": "string", "description": "Override of the provider's base URL."}},
    {"api_key_env": {
        "type": "string", "match": "^[A-Za-z_][A-Za-z0-9_]*$",
        "description": "Name of the environment variable (of the plugin server) that holds the API key.",
    }},
    {"api_key": {
        "type": "string", "referenceable": True, "encrypted": True, "starts_with": "{vault://",
        "description": "A Kong vault reference to the API key, e.g. {vault://env/openai-api-key}. Literal keys "
                       "are refused: keys do not belong in kong.yml.",
    }},
    {"timeout": {
        "type": "number", "default": 60, "gt": 0,
        "description": "Seconds allowed for one provider call (time to the first byte for streams).",
    }},
    {"name": {
        "type": "string", "match": "^[A-Za-z0-9][A-Za-z0-9._-]*$",
        "description": "Names the deployment in X-LLM-Deployment, records and metrics; default <alias>#<n>.",
    }},
    {"weight": {"type": "number", "default": 1, "gt": 0, "description": "Share of traffic (weighted strategy)."}},
    {"rpm": {"type": "integer", "gt": 0, "description": "Requests per minute this deployment may take."}},
    {"tpm": {"type": "integer", "gt": 0, "description": "Tokens per minute this deployment may take."}},
    {"price": {
        "type": "record", "required": False,
        "description": "Prices overriding LiteLLM's price map for this deployment, in USD per token.",
        "fields": [
            {"input_cost_per_token": {"type": "number", "between": [0, 1], "description": "USD per prompt token."}},
            {"output_cost_per_token": {"type": "number", "between": [0, 1],
                                       "description": "USD per completion token (reasoning tokens included)."}},
            {"cache_read_input_token_cost": {"type": "number", "between": [0, 1],
                                             "description": "USD per prompt token read from the provider's cache."}},
            {"cache_creation_input_token_cost": {
                "type": "number", "between": [0, 1],
                "description": "USD per prompt token written to the provider's cache (Anthropic's cache writes)."}},
        ],
    }},
]

ALIAS_NAMES = {"type": "array", "elements": {"type": "string"}}

ALIAS_FIELDS: list[dict[str, Any]] = [
    {"name": {"type": "string", "required": True, "match": "^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
              "description": "What clients send as 'model'; unique on the route."}},
    {"deployments": {
        "type": "array", "len_min": 1,
        "description": "Where the alias's requests go: providers, models, keys, weights, caps.",
        "elements": {"type": "record", "fields": DEPLOYMENT_FIELDS},
    }},
    {"strategy": {
        "type": "string", "default": "weighted", "one_of": ["weighted", "least-busy", "latency", "cost", "priority"],
        "description": "How a deployment is chosen: weighted random, fewest in flight, lowest latency, lowest "
                       "price, or kong.yml order.",
    }},
    {"fallbacks": dict(ALIAS_NAMES, description="Aliases tried, in order, when every deployment failed.")},
    {"context_window_fallbacks": dict(ALIAS_NAMES, description="Aliases tried when the prompt is too long.")},
    {"content_policy_fallbacks": dict(ALIAS_NAMES, description="Aliases tried on a content policy refusal.")},
    {"drop_params": {
        "type": "boolean", "default": False,
        "description": "Drop request parameters a deployment cannot honour (listed in the X-LLM-Dropped-Params "
                       "response header) instead of answering 400 naming them.",
    }},
    {"route_by_complexity": {
        "type": "record", "required": False,
        "description": "Makes this a routing alias: requests scoring at or above threshold go to strong.",
        "fields": [
            {"strong": {"type": "string", "required": True, "description": "Alias for hard prompts."}},
            {"weak": {"type": "string", "required": True, "description": "Alias for the rest."}},
            {"threshold": {"type": "number", "default": 0.5, "between": [0, 1],
                           "description": "Complexity score (0-1) from which the strong alias serves."}},
        ],
    }},
]

ROUTING_FIELDS: list[dict[str, Any]] = [
    {"retries": {"type": "integer", "default": 2, "between": [0, 10],
                 "description": "Attempts after each deployment of an alias was tried once, before its "
                                "fallbacks."}},
    {"backoff_initial": {"type": "number", "default": 0.25, "gt": 0, "description": "Seconds; doubles per retry."}},
    {"backoff_max": {"type": "number", "default": 4, "gt": 0,
                     "description": "Seconds; the longest backoff, and the longest Retry-After the gateway waits."}},
    {"deadline": {"type": "number", "default": 120, "gt": 0,
                  "description": "Seconds for the whole request: every attempt, backoff and fallback."}},
    {"latency_buffer": {"type": "number", "default": 0.1, "between": [0, 10],
                        "description": "Latency strategy: deployments this close (relative) to the fastest share."}},
    {"cooldown": {
        "type": "record", "required": False,
        "description": "When a failing deployment is taken out of rotation (shared through redis when set).",
        "fields": [
            {"allowed_fails": {"type": "integer", "default": 3, "gt": 0,
                               "description": "Transient failures within window that cool a deployment."}},
            {"window": {"type": "number", "default": 60, "gt": 0, "description": "Seconds failures are counted over."}},
            {"duration": {"type": "number", "default": 30, "gt": 0, "description": "Seconds a deployment cools."}},
            {"on_rate_limit": {"type": "boolean", "default": True,
                               "description": "A 429 cools the deployment at once, for its Retry-After."}},
            {"cool_last_healthy": {"type": "boolean", "default": False,
                                   "description": "Allow cooling the last deployment of an alias still serving."}},
        ],
    }},
]

BUDGET_FIELDS: list[dict[str, Any]] = [
    {"name": {"type": "string", "required": True, "match": "^[A-Za-z0-9_-]+$",
              "description": "Names the budget in 429 messages and llm_gateway_budget_rejections_total."}},
    {"window": {"type": "string", "required": True, "one_of": ["minute", "hour", "day", "month"],
                "description": "Fixed UTC window the limits apply to."}},
    {"tokens": {"type": "integer", "gt": 0, "description": "Tokens (prompt + completion) per consumer per window."}},
    {"usd": {"type": "number", "gt": 0, "description": "US dollars of provider cost per consumer per window."}},
    {"consumers": {
        "type": "array", "elements": {"type": "string"},
        "description": "Usernames (or ids) of the consumers this budget applies to; absent means every consumer.",
    }},
]

CONFIG_FIELDS: list[dict[str, Any]] = [
    {"models": {
        "type": "array", "required": True, "len_min": 1,
        "description": "The model aliases this route offers; clients send the alias as 'model'.",
        "elements": {"type": "record", "fields": ALIAS_FIELDS, "entity_checks": [
            {"at_least_one_of": ["deployments", "route_by_complexity"]},
            {"mutually_exclusive": ["deployments", "route_by_complexity"]},
        ]},
    }},
    {"routing": {
        "type": "record", "required": False,
        "description": "Retries, backoff, the per-request deadline and cooldowns.",
        "fields": ROUTING_FIELDS,
    }},
    {"model_access": {
        "type": "array", "default": [],
        "description": "Consumers named here may use only the aliases their entries list; others use all.",
        "elements": {"type": "record", "fields": [
            {"consumers": {"type": "array", "required": True, "len_min": 1, "elements": {"type": "string"},
                           "description": "Consumer usernames (or ids)."}},
            {"models": {"type": "array", "required": True, "elements": {"type": "string"},
                        "description": "The aliases they may use (403 model_not_allowed for others)."}},
        ]},
    }},
    {"max_body_bytes": {
        "type": "integer", "default": 1048576, "between": [1024, 67108864],
        "description": "Largest request body accepted; larger ones get 413.",
    }},
    {"budgets": {
        "type": "array", "default": [],
        "description": "Token and USD budgets per consumer over fixed windows; several apply at once.",
        "elements": {"type": "record", "fields": BUDGET_FIELDS},
    }},
    {"budget_reservation_tokens": {
        "type": "integer", "default": 1024, "gt": 0,
        "description": "Completion tokens reserved against budgets when a request sets no max_tokens.",
    }},
    {"limits": {
        "type": "record", "required": False,
        "description": "What one request may take: stream duration and silence, and the budget lease's grace.",
        "fields": [
            {"stream_max_duration": {"type": "number", "default": 600, "gt": 0,
                                     "description": "Seconds from the request's arrival after which the "
                                                    "gateway ends a stream (an SSE error event)."}},
            {"stream_idle_timeout": {"type": "number", "default": 120, "gt": 0,
                                     "description": "Seconds without a data event from the provider (SSE "
                                                    "comments and keep-alives do not count) before the "
                                                    "gateway ends a stream."}},
            {"min_completion_tokens": {"type": "integer", "default": 16, "gt": 0,
                                       "description": "When a token budget has fewer completion tokens left "
                                                      "than this, the request gets 429 instead of a stub."}},
            {"lease_grace": {"type": "number", "default": 60, "gt": 0,
                             "description": "Seconds a budget reservation outlives its request's deadline "
                                            "when its node dies: then it is given back and the request "
                                            "recorded as lost."}},
        ],
    }},
    {"budget_fail_open": {
        "type": "boolean", "default": False,
        "description": "Admit requests when the budget store (Redis) is unreachable; refused (503) by default.",
    }},
    {"redis": {
        "type": "record", "required": False,
        "description": "Shared state across Kong nodes: budgets and the usage record stream.",
        "fields": [
            {"url": {
                "type": "string", "required": True, "referenceable": True,
                "description": "redis://[:password@]host:port/db (or rediss://); a vault reference for secrets.",
            }},
            {"key_prefix": {"type": "string", "default": "llmgw:",
                            "description": "Prefix of every key the gateway writes (budgets, cooldowns)."}},
            {"usage_stream": {
                "type": "string", "default": "llmgw:usage",
                "description": "Redis Stream every usage record is appended to, for billing pipelines.",
            }},
            {"timeout": {"type": "number", "default": 0.5, "gt": 0,
                         "description": "Seconds for one Redis call; a budget check past it is 503 (fail closed)."}},
        ],
    }},
]


def kong_schema() -> dict[str, Any]:
    """The plugin entity schema, as Kong's plugin loader wants it."""
    return {"name": PLUGIN_NAME, "fields": [{"config": {"type": "record", "fields": CONFIG_FIELDS}}]}


def plugin_info() -> list[dict[str, Any]]:
    """What ``query_cmd`` prints: Kong 3.9 reads only the first entry (process.lua)."""
    return [{
        "Name": PLUGIN_NAME,
        "Priority": PLUGIN_PRIORITY,
        "Version": PLUGIN_VERSION,
        "Schema": kong_schema(),
        "Phases": PHASES,
    }]
