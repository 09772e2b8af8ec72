"""Attention: one entry point (`attend`), patterns as data, kernels in a registry."""
from ctxjax.attention import reference  # noqa: F401  (registers "reference")
from ctxjax.attention.api import IMPLEMENTATIONS, attend, register_implementation  # noqa: F401
from ctxjax.attention.patterns import PATTERNS, Pattern, make_pattern  # noqa: F401

try:  # optional kernels register themselves when present
  from ctxjax.attention import blockwise  # noqa: F401
except ImportError:  # pragma: no cover - blockwise lands in its own change
  pass
