"""The one attention entry point, and the registry of implementations behind it.

Every kernel takes the same explicit data — queries/keys/values, query and key positions,
query and key segment ids, a pattern (ctxjax.attention.patterns) and an optional ALiBi slope
vector — so the model never changes when a kernel is added: registering a function is enough.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

from ctxjax.attention.patterns import Pattern
from ctxjax.attention.shapes import check_shapes
from ctxjax.registry import Registry

IMPLEMENTATIONS: Registry[Callable] = Registry("model.attention_impl")


def register_implementation(name: str):
  """Decorator: make a kernel available as `attend(..., impl=name)`."""
  return IMPLEMENTATIONS.register(name)


def attend(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids, k_segment_ids,
           pattern: Pattern, alibi_slopes=None, impl: str = "reference", scale=None,
           contiguous_positions: bool = False):
  """Multi-head (grouped-query) attention.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
  positions / segment ids: int [batch, q_len] and [batch, kv_len] (segment 0 = padding; a
  query sees only keys of its own segment); alibi_slopes: float [heads] or None.
  contiguous_positions: the caller's static promise that within each segment positions step
  by exactly 1 per token (packed data). `auto` may then run splash on a TPU, checking the
  promise on the device (attention/fused.py); every other kernel ignores it.
  Returns [batch, q_len, heads, head_dim] in q's dtype.
  """
  kernel = IMPLEMENTATIONS.get(impl)
  check_shapes(q_BTHD, k_BSKD, v_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids)
  promise = {"contiguous_positions": True} if contiguous_positions and _takes_promise(
      kernel) else {}
  return kernel(
      q_BTHD, k_BSKD, v_BSKD, q_positions=q_positions, k_positions=k_positions,
      q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, pattern=pattern,
      alibi_slopes=alibi_slopes, scale=scale, **promise)


@functools.lru_cache(maxsize=None)
def _takes_promise(kernel) -> bool:
  return "contiguous_positions" in inspect.signature(kernel).parameters
