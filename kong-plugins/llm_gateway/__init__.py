"""kong-llm-gateway: a Kong external plugin that turns Kong into an LLM gateway.

Importing this package must stay cheap: Kong runs ``kong-llm-gateway dump`` (its ``query_cmd``) in every
process that loads schemas, so nothing here imports LiteLLM.
"""

PLUGIN_NAME = "llm-gateway"
PLUGIN_VERSION = "0.1.0"
# Below rate-limiting (910) and key-auth (1250): Kong runs higher priorities first, so our access phase only
# sees authenticated, rate-limited requests.
PLUGIN_PRIORITY = 780
