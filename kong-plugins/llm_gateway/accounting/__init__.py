"""What a request used and cost, charged once: token usage, prices, the per-request ledger, budgets with their
stores, leases, usage records and metrics.
"""
