"""Flow control: what decides *when* a provider call may happen, shared through Redis.

One module per mechanism (`retry_budget`, `breaker`, and budgets, leases and rate limits as
they land). Each keeps its state in Redis, never in process memory, so every worker process on
every machine sees the same picture, and each uses Redis's clock (TIME inside Lua scripts) so
workers with drifting clocks still agree. When Redis cannot be reached they fail open: flow
control protects providers and budgets, it must not stop the queue by itself.
"""
