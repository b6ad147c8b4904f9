"""Deliver: the result store and the per-destination outbox (C-STORE with retries)."""
