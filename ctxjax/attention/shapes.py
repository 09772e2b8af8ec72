"""The shape contract every kernel shares, and the one padding helper of the blocked kernels.

q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] with heads a
multiple of kv_heads (grouped-query attention); positions / segment ids: int [batch, q_len] and
[batch, kv_len].
"""
from __future__ import annotations

import jax.numpy as jnp


def check_shapes(q_BTHD, k_BSKD, v_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids,
                 *, what: str = "attention") -> None:
  """ValueError (prefixed by `what`) unless the arrays follow the contract above."""
  batch, q_len, num_heads, head_dim = q_BTHD.shape
  if k_BSKD.shape != v_BSKD.shape or k_BSKD.shape[0] != batch or k_BSKD.shape[3] != head_dim:
    raise ValueError(f"{what} shapes do not match: q {q_BTHD.shape}, k {k_BSKD.shape}, "
                     f"v {v_BSKD.shape} (want [batch, len, heads, head_dim])")
  if num_heads % k_BSKD.shape[2]:
    raise ValueError(f"{what}: query heads ({num_heads}) must be a multiple of kv heads "
                     f"({k_BSKD.shape[2]})")
  for name, arr, length in (("q_positions", q_positions, q_len),
                            ("q_segment_ids", q_segment_ids, q_len),
                            ("k_positions", k_positions, k_BSKD.shape[1]),
                            ("k_segment_ids", k_segment_ids, k_BSKD.shape[1])):
    if arr.shape != (batch, length):
      raise ValueError(f"{what} {name} has shape {arr.shape}, want {(batch, length)}")


def pad_rows(x, length: int, fill=0):
  """[B, T, ...] -> [B, length, ...]: rows past T set to `fill` (a scalar, or [B, 1] for a
  per-row value such as the last position)."""
  if length == x.shape[1]:
    return x
  fill = jnp.broadcast_to(jnp.asarray(fill).reshape(
      jnp.shape(fill) + (1,) * (x.ndim - jnp.ndim(fill))), (x.shape[0], length - x.shape[1])
                          + x.shape[2:])
  return jnp.concatenate([x, fill.astype(x.dtype)], axis=1)
