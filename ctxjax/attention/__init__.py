"""Attention: one entry point (`attend`), patterns as data, kernels in a registry."""
from ctxjax.attention import (  # noqa: F401  (register kernels)
    blockwise, context_parallel, fused, reference, ring)
from ctxjax.attention.api import IMPLEMENTATIONS, attend, register_implementation  # noqa: F401
from ctxjax.attention.patterns import PATTERNS, Pattern, make_pattern  # noqa: F401
