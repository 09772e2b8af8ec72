"""Absolute position embeddings (baselines).

Sinusoidal: Vaswani et al. 2017, interleaved layout
PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)).
Learned absolute embeddings (a [Lmax, D] table as in nanodo) are a plain
``nn.Embed`` indexed by positions and live with the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sinusoidal_embedding(positions_BT, dim: int, base: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding float32 [B, T, dim], interleaved sin/cos layout."""
  if dim % 2:
    raise ValueError(f"dim must be even, got {dim}")
  pos_BT = jnp.asarray(positions_BT).astype(jnp.float32)
  inv_I = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))  # [dim/2]
  ang_BTI = pos_BT[..., None] * inv_I.reshape((1,) * pos_BT.ndim + inv_I.shape)
  # Stack (sin, cos) on a trailing axis and flatten -> [sin0, cos0, sin1, cos1, ...].
  pe_BTI2 = jnp.stack([jnp.sin(ang_BTI), jnp.cos(ang_BTI)], axis=-1)
  return pe_BTI2.reshape(*pos_BT.shape, dim)
