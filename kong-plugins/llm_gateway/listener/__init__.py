"""The loopback HTTP listener Kong proxies admitted requests to: strict HTTP, bodies, the ticket check, and the
dispatch to the endpoint that answers.
"""
