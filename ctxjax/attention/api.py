"""The one attention entry point, and the registry of implementations behind it.

Every kernel takes the same explicit data — queries/keys/values, query and key positions,
query and key segment ids, a pattern (ctxjax.attention.patterns) and an optional ALiBi slope
vector — so the model never changes when a kernel is added: registering a function is enough.
"""
from __future__ import annotations

from typing import Callable

from ctxjax.attention.patterns import Pattern

IMPLEMENTATIONS: dict[str, Callable] = {}


def register_implementation(name: str):
  def wrap(fn):
    IMPLEMENTATIONS[name] = fn
    return fn
  return wrap


def attend(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids, k_segment_ids,
           pattern: Pattern, alibi_slopes=None, impl: str = "reference", scale=None):
  """Multi-head (grouped-query) attention.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
  positions / segment ids: int [batch, q_len] and [batch, kv_len] (segment 0 = padding; a
  query sees only keys of its own segment); alibi_slopes: float [heads] or None.
  Returns [batch, q_len, heads, head_dim] in q's dtype.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl={impl!r}; valid choices: {sorted(IMPLEMENTATIONS)}")
  batch, q_len, num_heads, head_dim = q_BTHD.shape
  if k_BSKD.shape != v_BSKD.shape or k_BSKD.shape[0] != batch or k_BSKD.shape[3] != head_dim:
    raise ValueError(f"attention shapes do not match: q {q_BTHD.shape}, k {k_BSKD.shape}, "
                     f"v {v_BSKD.shape} (want [batch, len, heads, head_dim])")
  if num_heads % k_BSKD.shape[2]:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads "
                     f"({k_BSKD.shape[2]})")
  for name, arr, length in (("q_positions", q_positions, q_len),
                            ("q_segment_ids", q_segment_ids, q_len),
                            ("k_positions", k_positions, k_BSKD.shape[1]),
                            ("k_segment_ids", k_segment_ids, k_BSKD.shape[1])):
    if arr.shape != (batch, length):
      raise ValueError(f"attention {name} has shape {arr.shape}, want {(batch, length)}")
  return IMPLEMENTATIONS[impl](
      q_BTHD, k_BSKD, v_BSKD, q_positions=q_positions, k_positions=k_positions,
      q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, pattern=pattern,
      alibi_slopes=alibi_slopes, scale=scale)
