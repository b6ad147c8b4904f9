"""Orchestration: what happens to a study between "complete" and "results published" (routing, scheduling,
the study tracker and the series pipeline)."""
