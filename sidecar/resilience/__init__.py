"""Sending with the route's resilience rules: circuit breaker, budgeted retries, load shedding."""
