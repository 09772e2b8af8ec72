"""Blockwise attention == dense reference (values and q/k/v gradients), block skipping, errors."""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention import attend, make_pattern
from ctxjax.attention import blockwise as bw
from ctxjax.attention import ring_loops
from ctxjax.attention.reference import reference_attention

try:
  from ctxjax.positions.alibi import alibi_slopes as _alibi_slopes
except ImportError:  # pragma: no cover - the positions module lands separately
  def _alibi_slopes(h):
    return np.asarray([2.0 ** (-8.0 * i / h) for i in range(1, h + 1)], np.float32)

FP32_TOL = 1e-5
# bf16 inputs: the kernel's error against the float32 reference (on the same bf16-rounded inputs)
# must stay within 2x the dense reference's own bf16 error + 1e-2 (both round P to bf16 before
# P @ V; the kernel's backward runs in float32, so its gradients are usually closer).
BF16_SLACK = 1e-2

B, D = 2, 16
CAUSAL = make_pattern("causal")
FULL = make_pattern("full")
WINDOW = make_pattern("sliding_window", window=11)
LAMBDA = make_pattern("lambda", n_global=5, n_local=13)


def _inputs(t, h=4, kv=4, seed=0, dtype=jnp.float32, s=None):
  """Random q, k, v, dout (numpy RNG: no per-shape eager XLA compiles in the tests)."""
  s = t if s is None else s
  rng = np.random.default_rng(seed)
  shapes = [(B, t, h, D), (B, s, kv, D), (B, s, kv, D), (B, t, h, D)]
  return [jnp.asarray(rng.standard_normal(sh, np.float32)).astype(dtype) for sh in shapes]


def _arange(t):
  return jnp.asarray(np.broadcast_to(np.arange(t, dtype=np.int32), (B, t)))


def _packed_segments(t):
  """Documents of uneven lengths crossing block boundaries; trailing padding (segment 0)."""
  seg = np.zeros((B, t), np.int32)
  seg[0, :] = np.repeat([1, 2, 3], [t // 3 + 5, t // 3 - 2, t - 2 * (t // 3) - 3])
  seg[1, : t - 7] = np.repeat([4, 5], [9, t - 16])
  return jnp.asarray(seg)


def _packed_positions(seg):
  """Positions restart at 0 in every document (packing)."""
  seg = np.asarray(seg)
  pos = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for i in range(1, seg.shape[1]):
      pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
  return jnp.asarray(pos)


def _vjp(fn, q, k, v, do):
  out, pull = jax.vjp(fn, q, k, v)
  return (out,) + tuple(pull(do))


@functools.lru_cache(maxsize=None)
def _pair_fn(pattern, has_alibi, block_q, block_k):
  """One jitted function (per static config) -> (reference, blockwise) (out, dq, dk, dv).

  Positions, segment ids and slopes are traced arguments, so every data layout of a test shares
  one compilation (keeps the file fast: compiling the kernel dominates its runtime).
  """
  def both(q, k, v, do, q_pos, k_pos, q_seg, k_seg, slopes):
    kw = dict(q_positions=q_pos, k_positions=k_pos, q_segment_ids=q_seg, k_segment_ids=k_seg,
              pattern=pattern, alibi_slopes=slopes if has_alibi else None)
    ref = _vjp(lambda q, k, v: reference_attention(q, k, v, **kw), q, k, v, do)
    got = _vjp(lambda q, k, v: bw.blockwise_attention(q, k, v, block_q=block_q,
                                                      block_k=block_k, **kw), q, k, v, do)
    errs = [jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))
            for r, g in zip(ref, got)]
    return ref, got, jnp.stack(errs)
  return jax.jit(both)


def _run(q, k, v, do, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
         alibi_slopes=None, block_q=16, block_k=8):
  slopes = jnp.zeros((q.shape[2],)) if alibi_slopes is None else jnp.asarray(alibi_slopes)
  return _pair_fn(pattern, alibi_slopes is not None, block_q, block_k)(
      q, k, v, do, q_positions, k_positions, q_segment_ids, k_segment_ids, slopes)


def _compare(q, k, v, do, *, tol=FP32_TOL, **kw):
  ref, got, errs = _run(q, k, v, do, **kw)
  for name, r, g, err in zip(("out", "dq", "dk", "dv"), ref, got, np.asarray(errs)):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    assert err <= tol, f"{name}: max abs err {err:.3g} > {tol}"
  return got


def _kw(pos, seg, pattern, alibi=None, k_pos=None, k_seg=None):
  return dict(q_positions=pos, k_positions=pos if k_pos is None else k_pos,
              q_segment_ids=seg, k_segment_ids=seg if k_seg is None else k_seg,
              pattern=pattern, alibi_slopes=alibi)


T = 64  # 4 query blocks of 16 x 8 key blocks of 8: several blocks, skipping happens


# The pattern code (mask / block_visible) and the ALiBi term are independent paths of the kernel:
# every pattern runs with ALiBi, and the no-bias path with causal (each config is a compile).
@pytest.mark.parametrize("pattern,alibi", [(CAUSAL, False), (CAUSAL, True), (FULL, True),
                                           (WINDOW, True)],
                         ids=["causal-nobias", "causal-alibi", "full-alibi", "window-alibi"])
@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_matches_reference(pattern, packed, alibi):
  q, k, v, do = _inputs(T)
  if packed:
    seg = _packed_segments(T)
    pos = _packed_positions(seg)
  else:
    seg = jnp.ones((B, T), jnp.int32)
    pos = _arange(T)
  slopes = jnp.asarray(_alibi_slopes(4)) if alibi else None
  _compare(q, k, v, do, **_kw(pos, seg, pattern, slopes))


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gqa(kv_heads, pattern=CAUSAL):
  q, k, v, do = _inputs(T, h=4, kv=kv_heads, seed=1)
  seg = _packed_segments(T)
  _compare(q, k, v, do, **_kw(_packed_positions(seg), seg, pattern,
                              jnp.asarray(_alibi_slopes(4))))


@pytest.mark.parametrize("layout", ["random_sorted", "pose_jumps"])
@pytest.mark.parametrize("pattern", [CAUSAL, WINDOW], ids=lambda p: p.kind)
def test_noncontiguous_positions(layout, pattern):
  rng = np.random.default_rng(0)
  if layout == "random_sorted":
    pos = np.sort(rng.choice(400, size=(B, T), replace=False), axis=1)
  else:  # PoSE: chunks of contiguous ids with large skips between them
    starts = np.array([[0, 100, 230, 900], [0, 5, 61, 2000]])
    pos = (starts[:, :, None] + np.arange(T // 4)).reshape(B, T)
  pos = jnp.asarray(pos, jnp.int32)
  q, k, v, do = _inputs(T, seed=2)
  seg = jnp.ones((B, T), jnp.int32)
  _compare(q, k, v, do, **_kw(pos, seg, pattern, jnp.asarray(_alibi_slopes(4))))


def test_cross_attention_lengths_and_rows_without_keys():
  """q_len != kv_len, and query segments absent from the keys: output 0, finite grads."""
  q, k, v, do = _inputs(32, seed=3, s=48)
  q_pos = _arange(48)[:, 16:]
  k_pos = _arange(48)
  q_seg = jnp.asarray(np.repeat([[1, 2, 9, 0]], 8, axis=1).repeat(B, 0), jnp.int32)
  k_seg = jnp.asarray(np.repeat([[1, 1, 2, 2, 0, 0]], 8, axis=1).repeat(B, 0), jnp.int32)
  out = _compare(q, k, v, do, **_kw(q_pos, q_seg, CAUSAL, k_pos=k_pos, k_seg=k_seg))[0]
  assert float(jnp.abs(out[:, 16:24]).max()) == 0.0  # segment 9 has no keys


def test_bf16():
  q, k, v, do = _inputs(T, dtype=jnp.bfloat16, seed=4)
  seg = _packed_segments(T)
  kw = _kw(_packed_positions(seg), seg, CAUSAL, jnp.asarray(_alibi_slopes(4)))
  ref16, got16, _ = _run(q, k, v, do, **kw)
  exact, _, _ = _run(*[x.astype(jnp.float32) for x in (q, k, v, do)], **kw)
  for name, e, r, g in zip(("out", "dq", "dk", "dv"), exact, ref16, got16):
    assert g.dtype == jnp.bfloat16, name
    e, r, g = (np.asarray(x).astype(np.float32) for x in (e, r, g))
    ref_err, err = np.abs(r - e).max(), np.abs(g - e).max()
    assert err <= 2 * ref_err + BF16_SLACK, f"{name}: bf16 err {err:.3g} (reference {ref_err:.3g})"


def test_default_blocks_and_padding(monkeypatch):
  assert bw.choose_block(200, None, 256, "block_q") == (200, 200)   # short: one block
  assert bw.choose_block(1024, None, 256, "block_q") == (256, 1024)
  assert bw.choose_block(1000, None, 256, "block_q") == (250, 1000)  # largest divisor <= 256
  assert bw.choose_block(257, None, 256, "block_q") == (256, 512)    # prime: padded
  # A prime length with default blocks runs padded and still matches the reference (defaults
  # shrunk to 16 so that the padded path runs with several blocks at a test-friendly size).
  monkeypatch.setattr(bw, "DEFAULT_BLOCK_Q", 16)
  monkeypatch.setattr(bw, "DEFAULT_BLOCK_K", 16)
  monkeypatch.setattr(bw, "MIN_AUTO_BLOCK", 8)
  t = 37
  q, k, v, do = _inputs(t, seed=5)
  seg = jnp.asarray(np.repeat([[1, 2]], [20, t - 20], axis=1).repeat(B, 0), jnp.int32)
  pos = _arange(t)
  for pattern in (CAUSAL, LAMBDA):
    _compare(q, k, v, do, block_q=None, block_k=None, **_kw(pos, seg, pattern))
  sched = jax.jit(lambda p, s: bw.schedule_for(p, p, s, s, pattern=CAUSAL))(pos, seg)
  assert sched.shape == (3, 3) and int(sched.sum()) == 6


def test_block_must_divide_length():
  q, k, v, _ = _inputs(T)
  kw = _kw(_arange(T), jnp.ones((B, T), jnp.int32), CAUSAL)
  with pytest.raises(ValueError, match=r"block_q=24 .*length 64"):
    bw.blockwise_attention(q, k, v, block_q=24, block_k=8, **kw)
  with pytest.raises(ValueError, match=r"block_k=48 .*length 64"):
    bw.blockwise_attention(q, k, v, block_q=16, block_k=48, **kw)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 16])
def test_visit_counts(n):
  blk = 16
  t = n * blk
  pos = _arange(t)[:1]
  one = jnp.ones((1, t), jnp.int32)
  docs = jnp.asarray(np.arange(t) // (2 * blk), jnp.int32)[None]  # 2-block documents

  @jax.jit
  def counts(pos, one, docs):
    sched = lambda pattern, seg: bw.visit_schedule(pos, pos, seg, seg, pattern=pattern,
                                                   block_q=blk, block_k=blk).sum()
    return jnp.stack([sched(CAUSAL, one), sched(FULL, one),
                      sched(make_pattern("sliding_window", window=blk), one),
                      sched(FULL, docs)])

  causal, full, window, packed = np.asarray(counts(pos, one, docs)).tolist()
  assert causal == n * (n + 1) // 2
  assert full == n * n
  assert window == 2 * n - 1  # window of one block: diagonal + previous block, linear in n
  assert packed == 4 * (n // 2) + n % 2  # no cross-document pair is visited
  assert bw.count_visits(pos, pos, one, one, pattern=CAUSAL, block_q=blk,
                         block_k=blk) == causal


@pytest.mark.parametrize("pattern", [make_pattern("sliding_window", window=13), LAMBDA],
                         ids=["window", "lambda"])
def test_banded_patterns_packed_length_not_multiple_of_window(pattern):
  """Window / Lambda (window 13 = n_local) with packed documents crossing blocks, positions
  restarting per document, trailing padding, ALiBi; T = 72 is not a multiple of 13."""
  t = 72
  q, k, v, do = _inputs(t, seed=8)
  seg = _packed_segments(t)
  _compare(q, k, v, do, block_q=24, block_k=8,
           **_kw(_packed_positions(seg), seg, pattern, jnp.asarray(_alibi_slopes(4))))


@pytest.mark.parametrize("pattern,visits", [
    (make_pattern("sliding_window", window=24), lambda n: 4 * n - 6),
    (make_pattern("lambda", n_global=4, n_local=24), lambda n: 5 * n - 10)],
    ids=["window", "lambda"])
def test_kernel_runs_linear_number_of_block_pairs(pattern, visits, monkeypatch):
  """Windowed / Lambda patterns cost O(T * w), not O(T^2): the kernel's forward and backward
  loops run one step per visible block pair, COUNTED INSIDE THE KERNEL (a host callback in the
  block-pair functions it calls), and that is linear in the number of blocks n. Blocks of 8,
  window 24: query block i sees key blocks i-3..i -> 4n - 6 pairs (causal: n(n+1)/2); the
  Lambda mask adds the sink block 0 -> 5n - 10."""
  calls = collections.Counter()

  def counted(fn, name):
    def wrapper(*args, **kwargs):
      jax.debug.callback(lambda: calls.update([name]))
      return fn(*args, **kwargs)
    return wrapper

  monkeypatch.setattr(bw, "online_softmax_update", counted(bw.online_softmax_update, "fwd"))
  monkeypatch.setattr(bw, "block_backward", counted(bw.block_backward, "bwd"))
  blk = 8
  for n in (8, 16):
    t = n * blk
    q, k, v, do = _inputs(t, h=1, kv=1)
    kw = _kw(_arange(t), jnp.ones((B, t), jnp.int32), pattern)
    calls.clear()
    grads = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: bw.blockwise_attention(
        q, k, v, block_q=blk, block_k=blk, **kw), q, k, v)[1](do))(q, k, v)
    jax.block_until_ready(grads)
    jax.effects_barrier()
    assert calls["fwd"] == calls["bwd"] == visits(n) < n * (n + 1) // 2, (n, calls)
    assert bw.count_visits(kw["q_positions"], kw["k_positions"], kw["q_segment_ids"],
                           kw["k_segment_ids"], pattern=pattern, block_q=blk,
                           block_k=blk) == visits(n)


def test_visit_lists_compact_the_schedule():
  """Row r of the lists holds exactly the visited columns of row r, in increasing order."""
  sched = np.random.default_rng(0).random((6, 9)) < 0.4
  cols, count = (np.asarray(x) for x in bw.visit_lists(jnp.asarray(sched)))
  for r in range(6):
    assert cols[r, :count[r]].tolist() == np.flatnonzero(sched[r]).tolist()


def test_skipped_blocks_are_not_computed():
  """NaNs in blocks the schedule skips never reach the output or the gradients.

  A masked-but-computed block gives 0 * NaN = NaN through P @ V (as the dense reference shows),
  so finite results prove the pairs are skipped — in forward and backward. The NaN keys form
  their own document (segment 2), so only the segment ranges make those pairs skippable.
  """
  q, k, v, do = _inputs(T, seed=6)
  pos = _arange(T)
  seg = jnp.ones((B, T), jnp.int32).at[:, -16:].set(2)
  k = k.at[:, -16:].set(jnp.nan)
  v = v.at[:, -16:].set(jnp.nan)
  slopes = jnp.asarray(_alibi_slopes(4))  # (shares the compile of test_matches_reference)
  ref, got, _ = _run(q, k, v, do, **_kw(pos, seg, FULL, slopes))  # block_q 16, block_k 8
  out, dq, dk, dv = [np.asarray(x) for x in got]
  for x in (out, dq, dk, dv):
    assert np.isfinite(x[:, :-16]).all()
  assert np.isnan(out[:, -16:]).all()
  assert np.isnan(np.asarray(ref[0])[:, :-16]).all()  # the dense oracle does touch them
  # causal: the last key blocks are in every earlier query block's future
  seg = jnp.ones((B, T), jnp.int32)
  ref, got, _ = _run(q, k, v, do, **_kw(pos, seg, CAUSAL, slopes))
  assert np.isfinite(np.asarray(got[0])[:, :-16]).all()
  assert np.isnan(np.asarray(ref[0])[:, :-16]).all()


def test_residuals_linear_in_length():
  """The custom_vjp keeps (q, k, v, out, lse, ids): no [T, S]-sized residual."""
  t = 256
  q, k, v, _ = _inputs(t, h=2, kv=2)
  kw = _kw(_arange(t), jnp.ones((B, t), jnp.int32), CAUSAL)
  pull = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: bw.blockwise_attention(
      q, k, v, block_q=64, block_k=64, **kw), q, k, v)[1])(q, k, v)
  sizes = [x.size for x in jax.tree_util.tree_leaves(pull) if hasattr(x, "size")]
  assert sizes and max(sizes) <= B * t * 2 * D < t * t


def test_attend_registry_and_jit():
  q, k, v, _ = _inputs(T)
  seg = _packed_segments(T)
  kw = _kw(_packed_positions(seg), seg, WINDOW)
  got = jax.jit(lambda q, k, v: attend(q, k, v, impl="blockwise", **kw))(q, k, v)
  want = attend(q, k, v, impl="reference", **kw)
  assert float(jnp.abs(got - want).max()) <= FP32_TOL


def test_ring_building_blocks():
  """Key shards processed separately (forward + combine, backward with global lse) == full."""
  q, k, v, do = _inputs(T, h=4, kv=2, seed=7)
  seg = _packed_segments(T)
  pos = _packed_positions(seg)
  slopes = jnp.asarray(_alibi_slopes(4))
  ref, _, _ = _run(q, k, v, do, **_kw(pos, seg, CAUSAL, slopes))  # shares test_gqa's compile

  def shard_kw(k_pos, k_seg):
    return dict(q_positions=pos, k_positions=k_pos, q_segment_ids=seg, k_segment_ids=k_seg,
                pattern=CAUSAL, alibi_slopes=slopes, block_q=16, block_k=8)

  fwd = jax.jit(lambda k, v, kp, ks: bw.blockwise_forward(q, k, v, **shard_kw(kp, ks)))
  bwd = jax.jit(lambda k, v, kp, ks, out, lse: bw.blockwise_backward(
      q, k, v, out, lse, do, **shard_kw(kp, ks)))
  halves = [slice(0, T // 2), slice(T // 2, T)]
  parts = [fwd(k[:, sl], v[:, sl], pos[:, sl], seg[:, sl]) for sl in halves]
  out, lse = bw.combine_partials(*parts[0], *parts[1])
  assert float(jnp.abs(out - ref[0]).max()) <= FP32_TOL
  grads = [bwd(k[:, sl], v[:, sl], pos[:, sl], seg[:, sl], out, lse) for sl in halves]
  dq = grads[0][0] + grads[1][0]
  dk = jnp.concatenate([g[1] for g in grads], axis=1)
  dv = jnp.concatenate([g[2] for g in grads], axis=1)
  for name, r, g in (("dq", ref[1], dq), ("dk", ref[2], dk), ("dv", ref[3], dv)):
    assert float(jnp.abs(g - r).max()) <= FP32_TOL, name


def test_pass_on_loops_equal_the_plain_loops_bit_for_bit():
  """The ring's key-major loops that hand each key block on (ring_loops:
  `fold_and_pass_key_blocks`, `backward_and_pass_key_blocks`) compute exactly what the plain
  loops compute; with a pass that marks each block (+1 on K/V, + 100 on dK/dV) every block is
  passed exactly once."""
  q, k, v, do = _inputs(T, h=4, kv=2, seed=11)
  seg = _packed_segments(T)
  pos = _packed_positions(seg)
  kw = dict(pattern=WINDOW, scale=D ** -0.5,
            alibi_slopes_KG=jnp.asarray(_alibi_slopes(4)).reshape(2, 2))

  @jax.jit
  def run(q, k, v, do):
    qb = bw.query_blocks(q.reshape(B, T, 2, 2, D), pos, seg, 16)
    kb = bw.key_blocks(k, v, pos, seg, 8)
    state0 = bw.init_blocked_state(qb, *kb)
    plain = bw.fold_key_blocks(state0, qb, kb, **kw)
    mark = lambda b: bw.KeyBlocks(b.k + 1, b.v + 1, b.pos, b.seg)
    passed, kb_after = ring_loops.fold_and_pass_key_blocks(state0, qb, kb, pass_block=mark, **kw)
    out, lse = bw.finalize_state(plain)
    rg = bw.row_grads(do.reshape(B, T, 2, 2, D), bw.stat_unblocks(lse),
                      jnp.sum(bw.q_unblocks(out) * do.reshape(B, T, 2, 2, D), -1), 16)
    zeros = bw.zeros_grads(qb, kb, rg)
    grads = bw.backward_key_blocks(zeros, qb, rg, kb, **kw)
    mark_all = lambda x: (mark(x[0]), x[1] + 100, x[2] + 100)
    grads_passed = ring_loops.backward_and_pass_key_blocks(zeros, qb, rg, kb,
                                                           pass_block=mark_all, **kw)
    return plain, passed, kb, kb_after, grads, grads_passed

  plain, passed, kb, kb_after, grads, (dq, dk, dv, kb_back) = run(q, k, v, do)
  for a, b in zip(plain, passed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(kb_after.k), np.asarray(kb.k) + 1)
  np.testing.assert_array_equal(np.asarray(kb_back.v), np.asarray(kb.v) + 1)
  np.testing.assert_array_equal(np.asarray(dq), np.asarray(grads[0]))
  np.testing.assert_array_equal(np.asarray(dk), np.asarray(grads[1]) + 100)
  np.testing.assert_array_equal(np.asarray(dv), np.asarray(grads[2]) + 100)
