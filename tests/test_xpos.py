import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.positions.xpos import apply_xpos, xpos_zeta


def test_zeta_vectors():
  z64 = xpos_zeta(64)
  assert z64.shape == (32,) and z64.dtype == np.float32
  np.testing.assert_allclose([z64[0], z64[1], z64[-1]], [0.285714, 0.308036, 0.977679], atol=1e-6)
  z128 = xpos_zeta(128)
  assert z128.shape == (64,)
  np.testing.assert_allclose([z128[0], z128[-1]], [0.285714, 0.988839], atol=1e-6)


def test_factor_at_distance_2048():
  f = xpos_zeta(64).astype(np.float64) ** (2048 / 512)
  np.testing.assert_allclose([f[0], f[31]], [0.006664, 0.913660], atol=1e-6)


def _inv(d, base=10000.0):
  return base ** (-np.arange(0, d, 2, dtype=np.float64) / d)


def _np_logits(q, k, qp, kp, d, scale_base=512):
  """Independent oracle: rotate-half RoPE logits, pair i weighted by zeta_i^((m-n)/B)."""
  h = d // 2
  inv = _inv(d)
  zeta = (2 * np.arange(h) + 0.4 * d) / (1.4 * d)

  def rot(x, p):  # x [B,T,N,D], p [B,T]
    ang = p[..., None, None] * inv  # [B,T,1,h]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :h], x[..., h:]
    return x1 * c - x2 * s, x2 * c + x1 * s

  q1, q2 = rot(q.astype(np.float64), qp.astype(np.float64))
  k1, k2 = rot(k.astype(np.float64), kp.astype(np.float64))
  pair = np.einsum("bthi,bshi->bhtsi", q1, k1) + np.einsum("bthi,bshi->bhtsi", q2, k2)
  dist = (qp[:, :, None] - kp[:, None, :]).astype(np.float64)  # [B,T,S]
  w = zeta ** (dist[:, None, :, :, None] / scale_base)  # [B,1,T,S,h]
  return (pair * w).sum(-1)


def _jax_logits(q, k):
  return np.asarray(jnp.einsum("bthd,bshd->bhts", q, k))


def _data(seed=0, B=2, T=5, S=7, H=3, d=16, span=3000):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, H, d)).astype(np.float32)
  k = rng.standard_normal((B, S, H, d)).astype(np.float32)
  qp = np.sort(rng.choice(span, (B, T)), axis=1).astype(np.int32)
  kp = np.sort(rng.choice(span, (B, S)), axis=1).astype(np.int32)
  return q, k, qp, kp


def _rel_close(a, b, tol=2e-5):
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_logits_match_numpy_oracle():
  d = 16
  q, k, qp, kp = _data(d=d)
  qo, ko = apply_xpos(q, k, qp, kp, inv_freq=_inv(d).astype(np.float32))
  assert qo.shape == q.shape and qo.dtype == jnp.float32 and ko.shape == k.shape
  _rel_close(_jax_logits(qo, ko), _np_logits(q, k, qp, kp, d))


def test_decay_is_relative_to_scale_base_and_pair():
  # Pair i only, zero rotation (inv 0): logit = q.k * zeta_i^((m-n)/B) exactly.
  d = 8
  q = np.zeros((1, 1, 1, d), np.float32)
  k = np.zeros((1, 1, 1, d), np.float32)
  q[..., 1] = k[..., 1] = 1.0
  qo, ko = apply_xpos(q, k, np.array([[1536]]), np.array([[512]]),
                      inv_freq=np.zeros(d // 2, np.float32))
  np.testing.assert_allclose(_jax_logits(qo, ko)[0, 0, 0, 0], xpos_zeta(d)[1] ** 2, rtol=1e-6)


def test_gqa_and_bf16_dtype():
  d = 16
  q, k, qp, kp = _data(d=d, H=4)
  k1 = k[:, :, :1]  # one kv head
  qo, ko = apply_xpos(q.astype(jnp.bfloat16), k1.astype(jnp.bfloat16), qp, kp,
                      inv_freq=_inv(d).astype(np.float32))
  assert qo.dtype == jnp.bfloat16 and ko.dtype == jnp.bfloat16 and ko.shape == k1.shape


def test_invariant_to_shift_and_center():
  d = 32
  q, k, qp, kp = _data(seed=1, d=d)
  inv = _inv(d).astype(np.float32)
  base = _jax_logits(*apply_xpos(q, k, qp, kp, inv_freq=inv))
  shifted = _jax_logits(*apply_xpos(q, k, qp + 4000, kp + 4000, inv_freq=inv))
  _rel_close(shifted, base, 1e-4)  # larger absolute angles lose a little float32 precision
  for c in (0, 777, np.array([100, 2500])):
    _rel_close(_jax_logits(*apply_xpos(q, k, qp, kp, inv_freq=inv, center=c)), base)


def test_shape_errors():
  q = np.zeros((1, 2, 1, 8), np.float32)
  with pytest.raises(ValueError, match="inv_freq"):
    apply_xpos(q, q, np.zeros((1, 2), np.int32), np.zeros((1, 2), np.int32),
               inv_freq=np.zeros(8, np.float32))
