"""xPos / LeX: RoPE with an exponential, distance-dependent decay (Sun et al. 2023).

Reference: microsoft/torchscale ``torchscale/component/xpos_relative_position.py``.
zeta_i = (2i + gamma*d) / ((1+gamma)*d) (gamma 0.4), scale_base B = 512. The query at
m is scaled by zeta_i^((m-c)/B) and the key at n by zeta_i^(-(n-c)/B), so the logit
contribution of rotary pair i is multiplied by zeta_i^((m-n)/B) for any centre c.

Differences from torchscale (deliberate): rotate-half layout (pairs (i, i+d/2)) instead
of interleaved ``rotate_every_two``; explicit global positions instead of
``arange(len)`` plus offset; the centre c defaults to ``max(k_positions) // 2``
(torchscale centres exponents at -((len+offset)//2)); the logits are identical.

Float32 range: zeta_0 = 1/3.5 for gamma 0.4, and zeta_0^(-|p-c|/512) overflows float32
for |p-c| > ~36,260 (the matching positive power leaves the normal range at
|p-c| > ~35,700 and flushes to zero soon after), i.e. ~72K tokens even with centring.
Beyond that, apply zeta^((m-n)/B) per attention block from global offsets instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def xpos_zeta(head_dim: int, gamma: float = 0.4) -> np.ndarray:
  """Per-pair decay bases float32 [head_dim//2]: zeta_i = (2i + gamma*d) / ((1+gamma)*d)."""
  if head_dim % 2:
    raise ValueError(f"head_dim must be even, got {head_dim}")
  i = np.arange(head_dim // 2, dtype=np.float64)
  return ((2 * i + gamma * head_dim) / ((1 + gamma) * head_dim)).astype(np.float32)


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _rope_scaled(x_BTND, pos_BT, inv_I, scale_BTI):
  """Rotate-half RoPE of x at pos, each pair i (i, i+d/2) multiplied by scale_BTI[..., i]."""
  inv_11I = inv_I.reshape((1,) * pos_BT.ndim + inv_I.shape)
  ang_BTI = pos_BT.astype(jnp.float32)[..., None] * inv_11I  # float32 angles
  cos_BTD = jnp.concatenate([jnp.cos(ang_BTI) * scale_BTI] * 2, axis=-1)
  sin_BTD = jnp.concatenate([jnp.sin(ang_BTI) * scale_BTI] * 2, axis=-1)
  x = x_BTND.astype(jnp.float32)
  return x * cos_BTD[:, :, None, :] + _rotate_half(x) * sin_BTD[:, :, None, :]


def apply_xpos(q_BTHD, k_BSKD, q_positions_BT, k_positions_BS, *, inv_freq,
               scale_base: float = 512, gamma: float = 0.4, center=None):
  """Apply xPos to queries and keys; returns (q_BTHD, k_BSKD) in their input dtypes.

  inv_freq: [D/2] rotary inverse frequencies (e.g. base^(-2i/D)).
  center: scalar or [B] int; default ``jnp.max(k_positions_BS) // 2``. It cancels in
    every q.k logit; it only keeps the separate q/k scales inside float32 range
    (|p - center| must stay below ~35K, see the module docstring).
  """
  head_dim = q_BTHD.shape[-1]
  if k_BSKD.shape[-1] != head_dim:
    raise ValueError(f"q/k head dims differ: {head_dim} vs {k_BSKD.shape[-1]}")
  inv_I = jnp.asarray(inv_freq, dtype=jnp.float32)
  if inv_I.shape != (head_dim // 2,):
    raise ValueError(f"inv_freq must have shape ({head_dim // 2},), got {inv_I.shape}")
  q_pos_BT = jnp.asarray(q_positions_BT)
  k_pos_BS = jnp.asarray(k_positions_BS)
  if center is None:
    center = jnp.max(k_pos_BS) // 2
  c = jnp.asarray(center)
  c = c[:, None] if c.ndim == 1 else c  # [B] -> [B, 1]
  log_zeta_I = jnp.log(jnp.asarray(xpos_zeta(head_dim, gamma)))
  log_zeta_11I = log_zeta_I.reshape((1, 1, -1))
  # Relative offsets in integers (exact), then float32 exponents.
  q_exp_BT = (q_pos_BT - c).astype(jnp.float32) / scale_base
  k_exp_BS = -(k_pos_BS - c).astype(jnp.float32) / scale_base
  q_scale_BTI = jnp.exp(q_exp_BT[..., None] * log_zeta_11I)
  k_scale_BSI = jnp.exp(k_exp_BS[..., None] * log_zeta_11I)
  q_out = _rope_scaled(q_BTHD, q_pos_BT, inv_I, q_scale_BTI).astype(q_BTHD.dtype)
  k_out = _rope_scaled(k_BSKD, k_pos_BS, inv_I, k_scale_BSI).astype(k_BSKD.dtype)
  return q_out, k_out
