"""LongLoRA S2-Attn (Chen et al. 2024): group vectors, the roll variant's leak, head split / GQA
against a per-head dense oracle, blockwise == reference (values + grads), linear cost."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention import blockwise as bw
from ctxjax.attention import make_pattern
from ctxjax.attention.reference import reference_attention
from ctxjax.attention.s2 import s2_attention, s2_head_segment_ids, shifted_group_segment_ids
from attention_cases import packed as _packed, single as _single

FP32_TOL = 1e-5


def _groups(ids_T):
  ids_T = np.asarray(ids_T)
  return [list(np.flatnonzero(ids_T == i)) for i in dict.fromkeys(ids_T.tolist())]


def test_group_vectors():
  """L 16, G 4: plain [0-3][4-7][8-11][12-15]; flash shift [0,1][2-5][6-9][10-13][14,15]."""
  plain, shifted = shifted_group_segment_ids(jnp.ones((1, 16), jnp.int32), 4)
  r = lambda a, b: list(range(a, b))
  assert _groups(plain[0]) == [r(0, 4), r(4, 8), r(8, 12), r(12, 16)]
  assert _groups(shifted[0]) == [r(0, 2), r(2, 6), r(6, 10), r(10, 14), r(14, 16)]
  per_head = s2_head_segment_ids(jnp.ones((1, 16), jnp.int32), 4, 4)
  assert per_head.shape == (1, 4, 16)
  np.testing.assert_array_equal(per_head[0, 1], plain[0])
  np.testing.assert_array_equal(per_head[0, 2], shifted[0])


def test_groups_respect_documents_and_positions():
  seg = jnp.asarray([[1] * 5 + [2] * 11], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(11))], jnp.int32)
  r = lambda a, b: list(range(a, b))
  plain, shifted = shifted_group_segment_ids(seg, 4)  # index grid, cut at the document edge
  assert _groups(plain[0]) == [r(0, 4), [4], r(5, 8), r(8, 12), r(12, 16)]
  assert _groups(shifted[0]) == [r(0, 2), r(2, 5), r(5, 6), r(6, 10), r(10, 14), r(14, 16)]
  plain, shifted = shifted_group_segment_ids(seg, 4, positions_BT=pos)  # per-document grid
  assert _groups(plain[0]) == [r(0, 4), [4], r(5, 9), r(9, 13), r(13, 16)]
  assert _groups(shifted[0]) == [r(0, 2), r(2, 5), r(5, 7), r(7, 11), r(11, 15), [15]]


def _visibility(variant, length=16, group=4):
  """Probe: q = k = 0 gives uniform weights over the visible keys; v = identity reads them."""
  q = jnp.zeros((1, length, 2, length))
  v = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (1, length, 2, length))
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  out = jax.jit(lambda q, v: s2_attention(q, q, v, positions=pos, segment_ids=jnp.ones_like(pos),
                                          group_size=group, variant=variant))(q, v)
  return np.asarray(out[0] > 0).transpose(1, 0, 2)  # [head half, query, key]


def test_flash_and_roll_visibility():
  flash, roll = _visibility("flash"), _visibility("roll")
  pos = np.arange(16)
  causal = pos[None, :] <= pos[:, None]
  same = lambda g: g[:, None] == g[None, :]
  np.testing.assert_array_equal(flash[0], causal & same(pos // 4))
  np.testing.assert_array_equal(flash[1], causal & same((pos + 2) // 4))
  np.testing.assert_array_equal(roll[0], flash[0])
  leak = {(int(a), int(b)) for a, b in zip(*np.nonzero(roll[1] & ~flash[1]))}
  assert leak == {(0, 14), (0, 15), (1, 14), (1, 15)}
  assert not (flash[1] & ~roll[1]).any()


B, T, D = 2, 64, 8


def _qkv(h, kv, seed=0, t=T):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s, np.float32))
          for s in ((B, t, h, D), (B, t, kv, D), (B, t, kv, D), (B, t, h, D))]


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3)])
def test_matches_per_head_oracle(heads, kv_heads):
  """Each head h alone, with its own derived ids and kv head h // (H/K), reproduces the head."""
  q, k, v, _ = _qkv(heads, kv_heads, seed=heads + kv_heads)
  pos, seg = _packed(T)
  group = 16
  causal = make_pattern("causal")

  @jax.jit
  def run(q, k, v, pos, seg):
    got = s2_attention(q, k, v, positions=pos, segment_ids=seg, group_size=group)
    ids = s2_head_segment_ids(seg, group, heads)
    want = []
    for h in range(heads):
      kh = h // (heads // kv_heads)
      want.append(reference_attention(
          q[:, :, h:h + 1], k[:, :, kh:kh + 1], v[:, :, kh:kh + 1], q_positions=pos,
          k_positions=pos, q_segment_ids=ids[:, h], k_segment_ids=ids[:, h], pattern=causal))
    return got, jnp.concatenate(want, axis=2)

  got, want = run(q, k, v, pos, seg)
  assert float(jnp.abs(got - want).max()) <= 1e-6


def test_blockwise_matches_reference(monkeypatch):
  monkeypatch.setattr(bw, "DEFAULT_BLOCK_Q", 16)
  monkeypatch.setattr(bw, "DEFAULT_BLOCK_K", 8)
  monkeypatch.setattr(bw, "MIN_AUTO_BLOCK", 8)
  q, k, v, do = _qkv(4, 2)
  slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])

  @jax.jit
  def both(q, k, v, do, pos, seg):
    res = []
    for impl in ("reference", "blockwise"):
      fn = lambda q, k, v: s2_attention(q, k, v, positions=pos, segment_ids=seg, group_size=16,
                                        impl=impl, alibi_slopes=slopes)
      out, pull = jax.vjp(fn, q, k, v)
      res.append((out,) + pull(do))
    return res

  for pos, seg in (_single(T), _packed(T)):
    ref, got = both(q, k, v, do, pos, seg)
    for name, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
      err = float(jnp.max(jnp.abs(r - g)))
      assert err <= FP32_TOL, f"{name}: {err:.3g}"


def test_cost_linear_in_length():
  """Each half's schedule: every query block visits at most 2 key blocks (G = 2 blocks)."""
  blk, group = 8, 16

  @jax.jit
  def schedules(pos):
    ids = shifted_group_segment_ids(jnp.ones_like(pos), group)
    return [bw.visit_schedule(pos, pos, i, i, pattern=make_pattern("causal"), block_q=blk,
                              block_k=blk) for i in ids]

  for n in (4, 16, 64):
    for sched in schedules(jnp.arange(n * blk, dtype=jnp.int32)[None]):
      assert np.asarray(sched).sum(axis=1).max() <= 2


def test_errors():
  q = k = v = np.zeros((1, 16, 4, 8), np.float32)
  pos = np.zeros((1, 16), np.int32)
  kw = dict(positions=pos, segment_ids=pos)
  with pytest.raises(ValueError, match="even number of heads"):
    s2_attention(q[:, :, :3], k, v, group_size=4, **kw)
  with pytest.raises(ValueError, match="group_size"):
    s2_attention(q, k, v, group_size=1, **kw)
  with pytest.raises(ValueError, match="variant"):
    s2_attention(q, k, v, group_size=4, variant="wrap", **kw)
  with pytest.raises(ValueError, match="group_by"):
    s2_attention(q, k, v, group_size=4, group_by="tokens", **kw)
  with pytest.raises(ValueError, match="roll"):
    s2_attention(q, k, v, group_size=4, variant="roll", alibi_slopes=jnp.ones(4), **kw)
