"""Running the gateway: health, JSON logs, tracing, the smoke check, generated docs.
"""
