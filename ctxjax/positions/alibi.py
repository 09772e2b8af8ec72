"""ALiBi: attention with linear biases (Press et al. 2022).

Reference: ofirpress/attention_with_linear_biases, ``fairseq/models/transformer.py``
(``get_slopes``). The reference adds ``m_h * j`` (key index only) to the causal
mask, which is exact only under a full-row softmax; here the bias is built from
GLOBAL query/key positions, ``-m_h * (pos_q - pos_k)``, so it stays exact for
chunked, blockwise and ring attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _power_of_2_slopes(n: int) -> list[float]:
  # m_h = 2^(-8h/n), h = 1..n (geometric, start = ratio = 2^(-8/n)).
  return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]


def _slopes(n: int) -> list[float]:
  if n & (n - 1) == 0:
    return _power_of_2_slopes(n)
  c = 2 ** math.floor(math.log2(n))
  # Reference rule: the c-head slopes, then every other slope of the 2c-head list.
  return _power_of_2_slopes(c) + _slopes(2 * c)[0::2][: n - c]


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Per-head ALiBi slopes, float32 [H], the reference's rule (any H >= 1)."""
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}")
  return np.asarray(_slopes(int(num_heads)), dtype=np.float32)


def alibi_bias(q_positions_BT, k_positions_BS, slopes_H) -> jax.Array:
  """ALiBi logit bias float32 [B, H, T, S] = -slope_h * (q_pos - k_pos).

  Positions are global int ids, so a bias computed for any (q chunk, k chunk)
  equals the matching slice of the full bias. Keys after the query (non-causal)
  get a positive bias; mask them separately.
  """
  q_BT = jnp.asarray(q_positions_BT)
  k_BS = jnp.asarray(k_positions_BS)
  # Difference in integers first (exact), then float32.
  dist_BTS = (q_BT[:, :, None] - k_BS[:, None, :]).astype(jnp.float32)
  slopes_H = jnp.asarray(slopes_H, dtype=jnp.float32)
  return -slopes_H[None, :, None, None] * dist_BTS[:, None, :, :]
