"""Calling providers: LiteLLM in-process, the lean OpenAI-compatible path, the demo provider, what each parameter
becomes on a deployment, and the limits on a provider's stream.
"""
