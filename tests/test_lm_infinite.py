"""LM-Infinite distance ceiling: against a direct dense construction of the same logits (values +
gradients w.r.t. the UNROTATED q, k, v), both kernels, packed; visibility == the lambda
pattern; wiring through the model's positional scheme."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention import attend
from ctxjax.attention import blockwise as bw
from ctxjax.attention import make_pattern
from ctxjax.attention.lm_infinite import lm_infinite_attention
from ctxjax.model.config import model_config_from_dict
from ctxjax.positions import rope, schemes
from attention_cases import packed as _packed, single as _single

FP32_TOL = 1e-5
B, T, H, K, D = 2, 40, 4, 2, 8
N_GLOBAL, N_LOCAL = 3, 8
INV_FREQ = rope.rope_inv_freq(None, head_dim=D, rope_theta=10000.0,
                              max_position_embeddings=64)[0]


def _rotate(x, positions):
  return rope.apply_rope(x, positions, INV_FREQ)


def _qkv(seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s, np.float32))
          for s in ((B, T, H, D), (B, T, K, D), (B, T, K, D), (B, T, H, D))]


def _dense(q, k, v, pos, seg):
  """Logits written out pair by pair: local pairs <R(m) q, R(n) k>, global pairs
  <R(n_local) q, k> (key unrotated), one softmax over the Lambda-mask."""
  rep = H // K
  q_loc, k_loc = _rotate(q, pos), jnp.repeat(_rotate(k, pos), rep, axis=2)
  q_glob, k_glob = _rotate(q, jnp.full_like(pos, N_LOCAL)), jnp.repeat(k, rep, axis=2)
  s_loc = jnp.einsum("bthd,bshd->bhts", q_loc, k_loc) * D ** -0.5
  s_glob = jnp.einsum("bthd,bshd->bhts", q_glob, k_glob) * D ** -0.5
  m, n = pos[:, None, :, None], pos[:, None, None, :]
  same = seg[:, None, :, None] == seg[:, None, None, :]
  local = (n <= m) & (n > m - N_LOCAL) & same
  glob = (n < N_GLOBAL) & (n <= m - N_LOCAL) & same
  s = jnp.where(local, s_loc, jnp.where(glob, s_glob, -jnp.inf))
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", p, jnp.repeat(v, rep, axis=2))


def test_matches_dense_construction(monkeypatch):
  monkeypatch.setattr(bw, "DEFAULT_BLOCK_Q", 8)
  monkeypatch.setattr(bw, "DEFAULT_BLOCK_K", 8)
  monkeypatch.setattr(bw, "MIN_AUTO_BLOCK", 4)
  q, k, v, do = _qkv()

  @jax.jit
  def run(q, k, v, do, pos, seg):
    def vjp(fn):
      out, pull = jax.vjp(fn, q, k, v)
      return (out,) + pull(do)
    dense = vjp(lambda q, k, v: _dense(q, k, v, pos, seg))
    got = [vjp(functools.partial(lm_infinite_attention, positions=pos, segment_ids=seg,
                                 n_global=N_GLOBAL, n_local=N_LOCAL, rotate=_rotate, impl=impl))
           for impl in ("reference", "blockwise")]
    return dense, got

  for pos, seg in (_single(T), _packed(T)):
    dense, got = run(q, k, v, do, pos, seg)
    for impl, g in zip(("reference", "blockwise"), got):
      for name, a, b in zip(("out", "dq", "dk", "dv"), dense, g):
        err = float(jnp.max(jnp.abs(a - b)))
        assert err <= FP32_TOL, f"{impl} {name}: {err:.3g}"


def test_visibility_is_the_lambda_mask():
  """q = 0 gives uniform weights over exactly the visible keys (any rotation of 0 is 0)."""
  q = jnp.zeros((1, 16, 1, 16))
  v = jnp.eye(16)[None, :, None, :]
  pos = jnp.arange(16, dtype=jnp.int32)[None]
  out = jax.jit(lambda q, v: lm_infinite_attention(
      q, q, v, positions=pos, segment_ids=jnp.ones_like(pos), n_global=2, n_local=3,
      rotate=lambda x, p: x))(q, v)
  i = np.arange(16)
  want = np.asarray(make_pattern("lambda", n_global=2, n_local=3).mask(i[:, None], i[None]))
  np.testing.assert_array_equal(np.asarray(out[0, :, 0] > 0), want)


def test_model_scheme_wiring_and_short_sequences():
  """rotate_qk = the model's RoPE scheme; with n_local >= T the global branch is empty and the
  result is plain causal attention on rotated q/k."""
  cfg = model_config_from_dict(dict(head_dim=D, num_attention_heads=H, num_key_value_heads=K,
                                    max_position_embeddings=64))
  rotate_qk = functools.partial(schemes.get_scheme("rope").rotate_qk, cfg)
  q, k, v, _ = _qkv(seed=1)
  pos, seg = _packed(T)

  @jax.jit
  def run(q, k, v):
    kw = dict(positions=pos, segment_ids=seg, n_global=N_GLOBAL)
    a = lm_infinite_attention(q, k, v, n_local=N_LOCAL, rotate_qk=rotate_qk, **kw)
    b = lm_infinite_attention(q, k, v, n_local=N_LOCAL, rotate=_rotate, **kw)
    c = lm_infinite_attention(q, k, v, n_local=T, rotate=_rotate, **kw)
    d = attend(_rotate(q, pos), _rotate(k, pos), v, q_positions=pos, k_positions=pos,
               q_segment_ids=seg, k_segment_ids=seg, pattern=make_pattern("causal"))
    return a, b, c, d

  a, b, c, d = run(q, k, v)
  assert float(jnp.abs(a - b).max()) <= 1e-6
  assert float(jnp.abs(c - d).max()) <= 1e-6


def test_errors():
  x = np.zeros((1, 4, 1, 2), np.float32)
  pos = np.zeros((1, 4), np.int32)
  kw = dict(positions=pos, segment_ids=pos, n_global=1)
  with pytest.raises(ValueError, match="exactly one of rotate"):
    lm_infinite_attention(x, x, x, n_local=2, **kw)
  with pytest.raises(ValueError, match="n_local > 0"):
    lm_infinite_attention(x, x, x, n_local=0, rotate=lambda x, p: x, **kw)
