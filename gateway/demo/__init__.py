"""Synthetic studies that show what the gateway does: the phantoms (also the benchmarks' and tests' data) and
`gateway demo`, which sends one per reference pipeline to a running gateway and shows the results."""
