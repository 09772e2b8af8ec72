"""Evaluation: generation with a key/value cache (more to come: perplexity vs length,
passkey / needle grids, prompt compression)."""
from ctxjax.eval.generation import generate  # noqa: F401
