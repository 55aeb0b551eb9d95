"""Where a request goes: aliases over deployments, strategies, retries and fallbacks, the deployments' health
(memory or Redis), complexity routing.
"""
