"""LongNet dilated attention (Ding et al. 2023): head->position vectors, one branch == causal,
lse mixing == exact attention over disjoint keys (values + gradients), a dense re-expression of
multi-branch attention (values + gradients), blockwise == reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention import attend
from ctxjax.attention import blockwise as bw
from ctxjax.attention import make_pattern
from ctxjax.attention.dilated import (attend_with_lse, dilated_attention, dilated_coverage,
                                      merge_partials)
from attention_cases import packed as _packed, single as _single

FP32_TOL = 1e-5
B, D = 2, 8
CAUSAL = make_pattern("causal")


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
  """Blockwise kernels with several blocks at test sizes (sparse sequences are short)."""
  monkeypatch.setattr(bw, "DEFAULT_BLOCK_Q", 16)
  monkeypatch.setattr(bw, "DEFAULT_BLOCK_K", 8)
  monkeypatch.setattr(bw, "MIN_AUTO_BLOCK", 4)


def test_head_position_vectors():
  rows = lambda c: [np.flatnonzero(x).tolist() for x in c]
  even, odd = [0, 2, 4, 6], [1, 3, 5, 7]
  assert rows(dilated_coverage(8, 8, 2, 4)) == [even, even, odd, odd]
  g0, g1, g2 = [0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]
  assert rows(dilated_coverage(12, 12, 3, 6)) == [g0, g0, g1, g1, g2, g2]
  # torchscale head padding: H 3, r 2 -> groups of 2 heads; offsets restart per segment
  assert rows(dilated_coverage(10, 4, 2, 3)) == [[0, 2, 4, 6, 8]] * 2 + [[1, 3, 5, 7, 9]]


def _qkv(t, h, kv, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s, np.float32))
          for s in ((B, t, h, D), (B, t, kv, D), (B, t, kv, D), (B, t, h, D))]


def _vjp(fn, q, k, v, do):
  out, pull = jax.vjp(fn, q, k, v)
  return (out,) + pull(do)


def _assert_close(want, got, tol=FP32_TOL):
  for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
    assert np.isfinite(np.asarray(g)).all(), name
    err = float(jnp.max(jnp.abs(w - g)))
    assert err <= tol, f"{name}: max abs err {err:.3g} > {tol}"


def test_visibility_probe():
  """w 8, r 2, H 4 (one branch): head h, query t sees keys j <= t of t's segment with
  j = t = h // 2 (mod 2); other queries of that head output 0."""
  t = 16
  q = jnp.zeros((1, t, 4, t))
  v = jnp.broadcast_to(jnp.eye(t)[None, :, None, :], (1, t, 4, t))
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  out = jax.jit(lambda q, v: dilated_attention(q, q, v, positions=pos, segment_ids=pos * 0,
                                               segment_lengths=[8], dilation_rates=[2]))(q, v)
  i = np.arange(t)
  for h in range(4):
    g = h // 2
    want = ((i[:, None] // 8 == i[None] // 8) & (i[None] <= i[:, None]) & (i[:, None] % 2 == g)
            & (i[None] % 2 == g))
    np.testing.assert_array_equal(np.asarray(out[0, :, h] > 0), want)


def test_one_full_branch_is_causal_attention(impl="reference"):
  """Same kernel both sides, so equal to rounding (blockwise is pinned below)."""
  t = 32
  q, k, v, do = _qkv(t, 4, 2, seed=1)

  @jax.jit
  def both(q, k, v, do, pos, seg):
    kw = dict(positions=pos, segment_ids=seg)
    dil = _vjp(lambda q, k, v: dilated_attention(q, k, v, segment_lengths=[t], dilation_rates=[1],
                                                 impl=impl, **kw), q, k, v, do)
    ref = _vjp(lambda q, k, v: attend(q, k, v, q_positions=pos, k_positions=pos,
                                      q_segment_ids=seg, k_segment_ids=seg, pattern=CAUSAL,
                                      impl=impl), q, k, v, do)
    return ref, dil

  for pos, seg in (_single(t), _packed(t)):
    _assert_close(*both(q, k, v, do, pos, seg), tol=1e-6)


def test_mixing_disjoint_keys_is_exact_attention(impl="blockwise"):
  """Two partials over disjoint key halves, mixed by lse == attention over all keys, values AND
  gradients (stop-grad mixing weights would get the gradients wrong)."""
  t = 32
  q, k, v, do = _qkv(t, 4, 2, seed=2)
  pos, seg = _packed(t)
  first, second = slice(0, t // 2), slice(t // 2, t)
  two = lambda x, y: jnp.concatenate([x, y], axis=0)  # both halves in one kernel call

  @jax.jit
  def both(q, k, v, do):
    def mixed(q, k, v):
      out, lse = attend_with_lse(
          two(q, q), two(k[:, first], k[:, second]), two(v[:, first], v[:, second]),
          q_positions=two(pos, pos), k_positions=two(pos[:, first], pos[:, second]),
          q_segment_ids=two(seg, seg), k_segment_ids=two(seg[:, first], seg[:, second]),
          pattern=CAUSAL, impl=impl)
      return merge_partials([(out[:B], lse[:B]), (out[B:], lse[B:])])[0]
    full = lambda q, k, v: attend(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                                  k_segment_ids=seg, pattern=CAUSAL)
    return _vjp(full, q, k, v, do), _vjp(mixed, q, k, v, do)

  _assert_close(*both(q, k, v, do))


def _dense_dilated(q, k, v, pos, seg, branches):
  """Independent oracle: ONE softmax over the concatenation of every branch's key set (a key
  shared by two branches appears twice), straight from the definitions."""
  _, t, h, d = q.shape
  i = np.arange(t)
  masks = []
  for w, r in branches:
    w = min(w, t)
    group = np.arange(h) // -(-h // r)
    off = (i % w) % r
    masks.append((i[:, None] // w == i[None] // w)[None]
                 & (off[None, :, None] == group[:, None, None])
                 & (off[None, None, :] == group[:, None, None]))          # [H, T, S]
  n = len(branches)
  mask = jnp.asarray(np.concatenate(masks, axis=-1))[None]                 # [1, H, T, n*S]
  rep = h // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  visible = (pos[:, None, :] <= pos[:, :, None]) & (seg[:, None, :] == seg[:, :, None])
  mask = mask & jnp.tile(visible, (1, 1, n))[:, None]
  s = jnp.einsum("bthd,bshd->bhts", q, k) * d ** -0.5
  s = jnp.where(mask, jnp.tile(s, (1, 1, 1, n)), -jnp.inf)
  p = jnp.exp(s - jnp.max(jnp.where(mask, s, -1e30), axis=-1, keepdims=True))
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  return jnp.einsum("bhts,bshd->bthd", p, jnp.tile(v, (1, n, 1, 1)))


# (12, 2): heads split in 2 groups of 2 query + 1 kv head (GQA kept), short last segment;
# (32, 3): w > T (w' = 20), 4 heads padded to 3 groups of 2 (kv expanded), filler slots;
# no r = 1 branch, so some (query, head) rows are covered by no branch (output 0).
def test_matches_dense_reexpression(heads=4, kv_heads=2, t=20,
                                    branches=((12, 2), (32, 3))):
  q, k, v, do = _qkv(t, heads, kv_heads, seed=heads)
  seg_len, rates = zip(*branches)

  @jax.jit
  def run(q, k, v, do, pos, seg):
    dense = _vjp(lambda q, k, v: _dense_dilated(q, k, v, pos, seg, branches), q, k, v, do)
    got = [_vjp(lambda q, k, v: dilated_attention(
        q, k, v, positions=pos, segment_ids=seg, segment_lengths=seg_len, dilation_rates=rates,
        impl=impl), q, k, v, do) for impl in ("reference", "blockwise")]
    return dense, got

  for pos, seg in (_single(t), _packed(t)):
    dense, (ref, blk) = run(q, k, v, do, pos, seg)
    _assert_close(dense, ref)
    _assert_close(dense, blk)
    _assert_close(ref, blk)
    uncovered = np.all(np.asarray(dense[0]) == 0, axis=-1)
    assert 0 < uncovered.sum() < uncovered.size


def test_errors():
  x = np.zeros((1, 8, 2, 4), np.float32)
  pos = np.zeros((1, 8), np.int32)
  kw = dict(positions=pos, segment_ids=pos)
  with pytest.raises(ValueError, match="one dilation rate per segment length"):
    dilated_attention(x, x, x, segment_lengths=[4, 8], dilation_rates=[1], **kw)
  with pytest.raises(ValueError, match="dilation_rates must be positive integers"):
    dilated_attention(x, x, x, segment_lengths=[4], dilation_rates=[0], **kw)
  with pytest.raises(ValueError, match="impl"):
    dilated_attention(x, x, x, segment_lengths=[4], dilation_rates=[1], impl="ring", **kw)
