"""Triton: the server's lifecycle and supervision, the model registry, cross-study batching."""
