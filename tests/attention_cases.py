"""Shared inputs for the attention tests: position ids and segment ids of [2, t] batches."""
import jax.numpy as jnp
import numpy as np

BATCH = 2


def packed(t):
  """Row 0: three documents; row 1: two documents then padding (segment 0). Positions restart
  per document, so documents cross any block or shard boundary."""
  seg = np.zeros((BATCH, t), np.int32)
  seg[0] = np.repeat([1, 2, 3], [t // 3 + 5, t // 3 - 2, t - 2 * (t // 3) - 3])
  seg[1, : t - 7] = np.repeat([4, 5], [9, t - 16])
  pos = np.zeros_like(seg)
  for b in range(BATCH):
    for i in range(1, t):
      pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
  return jnp.asarray(pos), jnp.asarray(seg)


def single(t):
  """One document per row, positions 0..t-1."""
  return (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (BATCH, t)),
          jnp.ones((BATCH, t), jnp.int32))
