"""Blockwise (memory-efficient / flash-style) attention with block skipping.

Same contract as `reference` (TECHNIQUES.md §17): float32 scores and softmax whatever the input
dtype, grouped-query attention by viewing queries as [batch, kv_heads, group, ...] (query head h
reads kv head h // group), a query sees only keys of its own segment, ALiBi = -slope_h*(q_pos -
k_pos) from GLOBAL positions, and a row with no visible key outputs 0.

Algorithm
  * Queries are cut into blocks of `block_q`, keys/values into blocks of `block_k`. Each query
    block keeps an online-softmax state (running max m, denominator l, f32 accumulator) and folds
    the key blocks in one at a time (`online_softmax_update`), inside `lax.scan`s.
  * Block skipping. Positions are data, so which (query block, key block) pairs can hold a
    visible pair is decided at run time from each block's min/max position
    (`pattern.block_visible`) and min/max segment id (ranges must overlap); the resulting
    [n_q, n_k] schedule (`visit_schedule`) drives a `lax.cond` per pair, so an invisible pair
    costs a predicate, not a matmul — in forward and backward. Causal with n blocks visits
    n(n+1)/2 pairs, a sliding window O(n). A pair is skipped only when it is invisible for every
    batch row (batch rows share one loop).
  * Gradient: `jax.custom_vjp`. The forward saves only (q, k, v, out, lse); the backward
    recomputes each visible block's scores, P = exp(S - lse), and accumulates dq, dk, dv
    (FlashAttention-2 style: dS = P * (dP - rowsum(dO * O))). Activation memory is linear in T.

Building blocks for the ring kernel (§18) — all take the GLOBAL positions and segment ids of the
blocks they are given, in the kernel's internal layout (q: [B, K, G, Tq, D], k/v: [B, K, Tk, D],
state/lse/delta: [B, K, G, Tq]):
  * `init_state`, `online_softmax_update` (one q-block x kv-block step), `finalize_state`;
  * `block_backward` (dq, dk, dv contribution of one block pair given the GLOBAL lse and delta);
  * `blockwise_forward` -> (out [B,T,H,D], lse [B,T,H]; lse = -inf for rows that see no key)
    and `blockwise_backward` (full-shard backward given global out/lse), which a ring kernel can
    apply per rotated kv shard; `combine_partials` merges (out, lse) pairs from disjoint keys.

Block sizes. Defaults DEFAULT_BLOCK_Q/K = 256, measured fastest on XLA:CPU (fwd+bwd, T 512-4096:
128 ~ 256 < 512 << whole sequence; score tiles of 256x256 per head stay cache-resident, see
benchmarks/attention_blockwise.py). A sequence no longer than the default is one block; otherwise
the block is the largest divisor of the length in [MIN_AUTO_BLOCK=128, default]; if there is none
(e.g. a prime length) the sequence is padded internally to a multiple of the default, the padded
keys carrying a segment id no query has. Explicit `block_q` / `block_k` must divide the query /
key length, else ValueError.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ctxjax.attention.api import register_implementation
from ctxjax.attention.patterns import Pattern

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256
MIN_AUTO_BLOCK = 128

_F32 = jnp.float32
_NO_MAX = float(jnp.finfo(jnp.float32).min)  # running max before any visible key (finite)


def _varying(x) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def vary_like(x, *refs):
  """pcast `x` to vary over every manual (shard_map) axis that any of `refs` varies over, so
  scan / cond carries keep one type under shard_map(check_vma=True). No-op outside."""
  want = frozenset().union(*(_varying(r) for r in refs if r is not None))
  missing = tuple(sorted(want - _varying(x)))
  return lax.pcast(x, missing, to="varying") if missing else x


# ----------------------------------------------------------------------------------------------
# Block sizes and the visit schedule
# ----------------------------------------------------------------------------------------------

def choose_block(length: int, requested: int | None, default: int, name: str) -> tuple[int, int]:
  """(block, padded_length) for a sequence of `length`.

  An explicit `requested` block must divide `length` (ValueError otherwise). With the default:
  the whole sequence if length <= default, else the largest divisor of length in
  [MIN_AUTO_BLOCK, default], else `default` with the sequence padded up to a multiple of it.
  """
  if requested is not None:
    requested = int(requested)
    if requested <= 0:
      raise ValueError(f"blockwise attention: {name}={requested} must be > 0")
    if length % requested:
      raise ValueError(f"blockwise attention: {name}={requested} does not divide the sequence "
                       f"length {length}; pass a divisor of {length} or leave {name}=None "
                       f"(automatic)")
    return requested, length
  if length <= default:
    return length, length
  for block in range(default, MIN_AUTO_BLOCK - 1, -1):
    if length % block == 0:
      return block, length
  return default, -(-length // default) * default


def _block_ranges(x_BT, block):
  """Per-block (min, max) of an int [B, T] array -> two [B, n] arrays."""
  b, t = x_BT.shape
  xb = x_BT.reshape(b, t // block, block)
  return xb.min(-1), xb.max(-1)


def visit_schedule(q_positions, k_positions, q_segment_ids, k_segment_ids, *, pattern: Pattern,
                   block_q: int, block_k: int):
  """Bool [n_q, n_k]: which (query block, key block) pairs the kernel computes.

  A pair is visited iff, for some batch row, `pattern.block_visible` holds on the blocks'
  position ranges AND their segment-id ranges overlap. Everything else is skipped (lax.cond),
  in forward and backward. This is exactly the schedule the kernel uses.
  """
  q_lo, q_hi = _block_ranges(q_positions, block_q)
  k_lo, k_hi = _block_ranges(k_positions, block_k)
  qs_lo, qs_hi = _block_ranges(q_segment_ids, block_q)
  ks_lo, ks_hi = _block_ranges(k_segment_ids, block_k)
  e = lambda x: x[:, :, None]  # query blocks on axis 1
  f = lambda x: x[:, None, :]  # key blocks on axis 2
  vis = jnp.asarray(pattern.block_visible(e(q_lo), e(q_hi), f(k_lo), f(k_hi)))
  vis = jnp.broadcast_to(vis, (q_lo.shape[0], q_lo.shape[1], k_lo.shape[1]))
  vis &= (e(qs_lo) <= f(ks_hi)) & (f(ks_lo) <= e(qs_hi))
  return vis.any(axis=0)


def count_visits(q_positions, k_positions, q_segment_ids, k_segment_ids, *, pattern: Pattern,
                 block_q: int, block_k: int) -> int:
  """Number of block pairs the kernel computes (forward; the backward visits the same)."""
  return int(visit_schedule(q_positions, k_positions, q_segment_ids, k_segment_ids,
                            pattern=pattern, block_q=block_q, block_k=block_k).sum())


# ----------------------------------------------------------------------------------------------
# One block pair: forward online-softmax step and backward contribution (ring building blocks)
# ----------------------------------------------------------------------------------------------

class SoftmaxState(NamedTuple):
  m: jax.Array    # float32 [B, K, G, Tq]: running max (_NO_MAX until a visible key)
  l: jax.Array    # float32 [B, K, G, Tq]: running denominator sum exp(s - m)
  acc: jax.Array  # float32 [B, K, G, Tq, D]: running sum exp(s - m) v


def init_state(q_BKGTD, *vary_refs) -> SoftmaxState:
  shape = q_BKGTD.shape[:-1]
  v = lambda x: vary_like(x, q_BKGTD, *vary_refs)
  return SoftmaxState(v(jnp.full(shape, _NO_MAX, _F32)), v(jnp.zeros(shape, _F32)),
                      v(jnp.zeros(q_BKGTD.shape, _F32)))


def block_logits(q_BKGTD, k_BKSD, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, *, pattern, scale,
                 alibi_slopes_KG=None):
  """Float32 scores [B, K, G, Tq, Tk] of one block pair; invisible pairs are -inf."""
  s = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD, k_BKSD, preferred_element_type=_F32) * scale
  q_pos = q_pos_BT[:, None, None, :, None]
  k_pos = k_pos_BS[:, None, None, None, :]
  mask = pattern.mask(q_pos, k_pos)
  mask &= q_seg_BT[:, None, None, :, None] == k_seg_BS[:, None, None, None, :]
  if alibi_slopes_KG is not None:
    slopes = jnp.asarray(alibi_slopes_KG, _F32)[None, :, :, None, None]
    s = s - slopes * (q_pos - k_pos).astype(_F32)  # ALiBi from global positions
  return jnp.where(mask, s, -jnp.inf)


def online_softmax_update(state: SoftmaxState, q_BKGTD, k_BKSD, v_BKSD, q_pos_BT, k_pos_BS,
                          q_seg_BT, k_seg_BS, *, pattern, scale, alibi_slopes_KG=None):
  """Fold one key/value block into a query block's online-softmax state (§17)."""
  s = block_logits(q_BKGTD, k_BKSD, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, pattern=pattern,
                   scale=scale, alibi_slopes_KG=alibi_slopes_KG)
  m_new = jnp.maximum(state.m, s.max(axis=-1))  # finite: state.m starts at _NO_MAX
  p = jnp.exp(s - m_new[..., None])             # masked (-inf) -> 0
  alpha = jnp.exp(state.m - m_new)
  l_new = state.l * alpha + p.sum(axis=-1)
  pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v_BKSD.dtype), v_BKSD,
                  preferred_element_type=_F32)
  return SoftmaxState(m_new, l_new, state.acc * alpha[..., None] + pv)


def finalize_state(state: SoftmaxState):
  """-> (out float32 [B,K,G,T,D], lse float32 [B,K,G,T]); rows with no visible key: 0, -inf."""
  seen = state.l > 0
  out = state.acc / jnp.where(seen, state.l, 1.0)[..., None]
  lse = jnp.where(seen, state.m + jnp.log(jnp.where(seen, state.l, 1.0)), -jnp.inf)
  return out, lse


def block_backward(q_BKGTD, k_BKSD, v_BKSD, do_BKGTD, lse_BKGT, delta_BKGT, q_pos_BT, k_pos_BS,
                   q_seg_BT, k_seg_BS, *, pattern, scale, alibi_slopes_KG=None):
  """Gradient contribution of one block pair -> float32 (dq [B,K,G,Tq,D], dk, dv [B,K,Tk,D]).

  `lse` and `delta` = rowsum(dO * O) must be the GLOBAL ones (over all keys of the row);
  lse = -inf (row sees no key anywhere) is handled. Inputs are expected in float32.

  Scores are recomputed key-major, [B, K, Tk, G, Tq], so that dk = dS^T q and dv = P^T dO are
  plain row-major matmuls (measured ~15-25% faster on XLA:CPU than the query-major layout,
  which needs two transposed-lhs matmuls). `pattern.mask` is therefore called on positions
  shaped [B, 1, Tk, 1, Tq] / [B, 1, 1, 1, Tq]: patterns must be elementwise and broadcasting
  (as patterns.py requires), not assume a (Tq, Tk) trailing layout.
  """
  lse = jnp.where(jnp.isneginf(lse_BKGT), jnp.inf, lse_BKGT)  # empty row: P = 0, not NaN
  st = jnp.einsum("bksd,bkgtd->bksgt", k_BKSD, q_BKGTD, preferred_element_type=_F32) * scale
  q_pos = q_pos_BT[:, None, None, None, :]
  k_pos = k_pos_BS[:, None, :, None, None]
  mask = pattern.mask(q_pos, k_pos)
  mask &= q_seg_BT[:, None, None, None, :] == k_seg_BS[:, None, :, None, None]
  if alibi_slopes_KG is not None:
    slopes = jnp.asarray(alibi_slopes_KG, _F32)[None, :, None, :, None]
    st = st - slopes * (q_pos - k_pos).astype(_F32)  # same expression as block_logits
  st = jnp.where(mask, st, -jnp.inf)
  pt = jnp.exp(st - lse[:, :, None])  # P^T
  dv = jnp.einsum("bksgt,bkgtd->bksd", pt, do_BKGTD, preferred_element_type=_F32)
  dpt = jnp.einsum("bksd,bkgtd->bksgt", v_BKSD, do_BKGTD, preferred_element_type=_F32)
  dst = pt * (dpt - delta_BKGT[:, :, None]) * scale  # dS^T (scale folded in)
  dk = jnp.einsum("bksgt,bkgtd->bksd", dst, q_BKGTD, preferred_element_type=_F32)
  dq = jnp.einsum("bksgt,bksd->bkgtd", dst, k_BKSD, preferred_element_type=_F32)
  return dq, dk, dv


def merge_partials(partials):
  """Mix [(out [..., D], lse [...]), ...] by softmax over lse -> (out float32, lse).

  Exact attention over the union when the partials' key sets are disjoint; entries with
  lse = -inf get weight 0; if every lse is -inf: out 0, lse -inf. NaN-free gradients.
  """
  lse_N = jnp.stack([lse.astype(_F32) for _, lse in partials])
  top = lax.stop_gradient(jnp.max(lse_N, axis=0))  # a pure shift: cancels exactly
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e_N = jnp.where(jnp.isneginf(lse_N), 0.0, jnp.exp(lse_N - top))
  total = e_N.sum(axis=0)
  seen = total > 0
  safe = jnp.where(seen, total, 1.0)
  out = sum((e / safe)[..., None] * o.astype(_F32) for e, (o, _) in zip(e_N, partials))
  return out, jnp.where(seen, top + jnp.log(safe), -jnp.inf)


def combine_partials(out_a, lse_a, out_b, lse_b):
  """Merge two partial attentions over disjoint key sets (any layout; lse has out's shape[:-1])."""
  out, lse = merge_partials([(out_a, lse_a), (out_b, lse_b)])
  return out.astype(out_a.dtype), lse


# ----------------------------------------------------------------------------------------------
# Whole-sequence kernels (block loops)
# ----------------------------------------------------------------------------------------------

def _q_blocks(x_BTKGD, block):
  """[B, T, K, G, D] -> [n, B, K, G, block, D]."""
  b, t, k, g, d = x_BTKGD.shape
  return x_BTKGD.reshape(b, t // block, block, k, g, d).transpose(1, 0, 3, 4, 2, 5)


def _q_unblocks(x_nBKGbD):
  n, b, k, g, blk, d = x_nBKGbD.shape
  return x_nBKGbD.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * blk, k, g, d)


def _kv_blocks(x_BSKD, block):
  """[B, S, K, D] -> [n, B, K, block, D]."""
  b, s, k, d = x_BSKD.shape
  return x_BSKD.reshape(b, s // block, block, k, d).transpose(1, 0, 3, 2, 4)


def _kv_unblocks(x_nBKbD):
  n, b, k, blk, d = x_nBKbD.shape
  return x_nBKbD.transpose(1, 0, 3, 2, 4).reshape(b, n * blk, k, d)


def _row_blocks(x_BT, block):
  """[B, T] -> [n, B, block]."""
  b, t = x_BT.shape
  return x_BT.reshape(b, t // block, block).transpose(1, 0, 2)


def _stat_blocks(x_BTKG, block):
  """[B, T, K, G] -> [n, B, K, G, block]."""
  b, t, k, g = x_BTKG.shape
  return x_BTKG.reshape(b, t // block, block, k, g).transpose(1, 0, 3, 4, 2)


def _stat_unblocks(x_nBKGb):
  n, b, k, g, blk = x_nBKGb.shape
  return x_nBKGb.transpose(1, 0, 4, 2, 3).reshape(b, n * blk, k, g)


def _forward_blocks(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes_KG, *, pattern, scale, block_q,
                    block_k):
  """q [B,T,K,G,D], k/v [B,S,K,D] -> out f32 [B,T,K,G,D], lse f32 [B,T,K,G]."""
  vis = visit_schedule(q_pos, k_pos, q_seg, k_seg, pattern=pattern, block_q=block_q,
                       block_k=block_k)
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=slopes_KG)
  kv_xs = (_kv_blocks(k, block_k), _kv_blocks(v, block_k), _row_blocks(k_pos, block_k),
           _row_blocks(k_seg, block_k))

  def q_step(_, xs):
    q_i, qp_i, qs_i, vis_i = xs

    def k_step(state, ys):
      k_j, v_j, kp_j, ks_j, vis_ij = ys
      state = lax.cond(
          vis_ij,
          lambda st: online_softmax_update(st, q_i, k_j, v_j, qp_i, kp_j, qs_i, ks_j, **kw),
          lambda st: st, state)
      return state, None

    state, _ = lax.scan(k_step, init_state(q_i, *kv_xs, qp_i, qs_i, slopes_KG), kv_xs + (vis_i,))
    return None, finalize_state(state)

  _, (out, lse) = lax.scan(
      q_step, None,
      (_q_blocks(q, block_q), _row_blocks(q_pos, block_q), _row_blocks(q_seg, block_q), vis))
  return _q_unblocks(out), _stat_unblocks(lse)


def _backward_blocks(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, slopes_KG, *, pattern,
                     scale, block_q, block_k):
  """float32 q/do [B,T,K,G,D], k/v [B,S,K,D], lse/delta [B,T,K,G] -> float32 dq, dk, dv."""
  vis = visit_schedule(q_pos, k_pos, q_seg, k_seg, pattern=pattern, block_q=block_q,
                       block_k=block_k)
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=slopes_KG)
  q_xs = (_q_blocks(q, block_q), _q_blocks(do, block_q), _stat_blocks(lse, block_q),
          _stat_blocks(delta, block_q), _row_blocks(q_pos, block_q), _row_blocks(q_seg, block_q))
  k_blk = _kv_blocks(k, block_k)

  def k_step(dq_acc, xs):
    k_j, v_j, kp_j, ks_j, vis_j = xs

    def q_step(carry, ys):
      q_i, do_i, lse_i, delta_i, qp_i, qs_i, vis_ij = ys

      def visit(c):
        dq_i, dk_i, dv_i = block_backward(q_i, k_j, v_j, do_i, lse_i, delta_i, qp_i, kp_j,
                                          qs_i, ks_j, **kw)
        return (c[0] + dk_i, c[1] + dv_i), dq_i

      refs = (q_i, k_j, v_j, do_i, lse_i, delta_i, qp_i, kp_j, qs_i, ks_j, slopes_KG)

      def skip(c):
        return c, vary_like(jnp.zeros(q_i.shape, _F32), *refs)

      return lax.cond(vis_ij, visit, skip, carry)

    refs = (k_j, v_j, kp_j, ks_j) + q_xs + (slopes_KG,)
    zeros_kv = vary_like(jnp.zeros(k_j.shape, _F32), *refs)
    (dk_j, dv_j), dq_parts = lax.scan(q_step, (zeros_kv, zeros_kv), q_xs + (vis_j,))
    return dq_acc + dq_parts, (dk_j, dv_j)

  dq, (dk, dv) = lax.scan(
      k_step, vary_like(jnp.zeros(q_xs[0].shape, _F32), q, k, v, do, lse, delta, q_pos, k_pos,
                        q_seg, k_seg, slopes_KG),
      (k_blk, _kv_blocks(v, block_k), _row_blocks(k_pos, block_k), _row_blocks(k_seg, block_k),
       vis.T))
  return _q_unblocks(dq), _kv_unblocks(dk), _kv_unblocks(dv)


# ----------------------------------------------------------------------------------------------
# custom_vjp core
# ----------------------------------------------------------------------------------------------

def _group(q_BTHD, num_kv):
  b, t, h, d = q_BTHD.shape
  return q_BTHD.reshape(b, t, num_kv, h // num_kv, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _attention_core(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes_KG, pattern, scale, block_q,
                    block_k):
  out, _ = _core_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes_KG, pattern, scale, block_q,
                     block_k)
  return out


def _core_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes_KG, pattern, scale, block_q, block_k):
  qg = _group(q, k.shape[2])
  out, lse = _forward_blocks(qg, k, v, q_pos, k_pos, q_seg, k_seg, slopes_KG, pattern=pattern,
                             scale=scale, block_q=block_q, block_k=block_k)
  out = out.reshape(q.shape).astype(q.dtype)
  return out, (q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, slopes_KG)


def _core_bwd(pattern, scale, block_q, block_k, res, d_out):
  q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, slopes_KG = res
  dq, dk, dv = _backward_from_residuals(q, k, v, out, lse, d_out, q_pos, k_pos, q_seg, k_seg,
                                        slopes_KG, pattern, scale, block_q, block_k)
  d_slopes = None if slopes_KG is None else jnp.zeros_like(slopes_KG)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None,
          d_slopes)


def _backward_from_residuals(q, k, v, out, lse_BTKG, d_out, q_pos, k_pos, q_seg, k_seg,
                             slopes_KG, pattern, scale, block_q, block_k, delta_BTKG=None):
  num_kv = k.shape[2]
  qg = _group(q.astype(_F32), num_kv)
  dog = _group(d_out.astype(_F32), num_kv)
  if delta_BTKG is None:
    delta_BTKG = jnp.sum(dog * _group(out.astype(_F32), num_kv), axis=-1)
  dq, dk, dv = _backward_blocks(qg, k.astype(_F32), v.astype(_F32), dog, lse_BTKG, delta_BTKG,
                                q_pos, k_pos, q_seg, k_seg, slopes_KG, pattern=pattern,
                                scale=scale, block_q=block_q, block_k=block_k)
  return dq.reshape(q.shape), dk, dv


_attention_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def _prepare(q_BTHD, k_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids,
             alibi_slopes, scale, block_q, block_k):
  """Block sizes, padding (automatic blocks only) and the [K, G] slope view."""
  batch, q_len, num_heads, head_dim = q_BTHD.shape
  kv_len, num_kv = k_BSKD.shape[1], k_BSKD.shape[2]
  scale = head_dim ** -0.5 if scale is None else float(scale)
  bq, q_pad = choose_block(q_len, block_q, DEFAULT_BLOCK_Q, "block_q")
  bk, k_pad = choose_block(kv_len, block_k, DEFAULT_BLOCK_K, "block_k")
  slopes_KG = None
  if alibi_slopes is not None:
    slopes_KG = jnp.asarray(alibi_slopes, _F32).reshape(num_kv, num_heads // num_kv)
  return scale, bq, q_pad, bk, k_pad, slopes_KG


def _pad_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, q_pad, k_pad):
  """Pad to multiples of the block; padded keys get a segment id no query has."""
  q_len, kv_len = q.shape[1], k.shape[1]
  if q_pad == q_len and k_pad == kv_len:
    return q, k, v, q_pos, k_pos, q_seg, k_seg
  sentinel = jnp.minimum(q_seg.min(), k_seg.min()) - 1

  def pad_seq(x, n):
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, n - x.shape[1])
    return jnp.pad(x, widths)

  def pad_ids(x, n, value):
    return jnp.concatenate([x, jnp.broadcast_to(value, (x.shape[0], n - x.shape[1])).astype(
        x.dtype)], axis=1)

  q, k, v = pad_seq(q, q_pad), pad_seq(k, k_pad), pad_seq(v, k_pad)
  q_pos = pad_ids(q_pos, q_pad, q_pos[:, -1:])
  k_pos = pad_ids(k_pos, k_pad, k_pos[:, -1:])
  q_seg = pad_ids(q_seg, q_pad, sentinel)
  k_seg = pad_ids(k_seg, k_pad, sentinel)
  return q, k, v, q_pos, k_pos, q_seg, k_seg


@register_implementation("blockwise")
def blockwise_attention(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids,
                        k_segment_ids, pattern, alibi_slopes=None, scale=None, block_q=None,
                        block_k=None):
  """Blockwise attention, same contract as `reference_attention` (see module docstring).

  block_q / block_k: None = automatic (DEFAULT_BLOCK_Q/K, see `choose_block`), else a divisor
  of the query / key length. `scale` is a Python float (default head_dim ** -0.5). ALiBi slopes
  are treated as constants: their cotangent is zero (they are never trained).
  """
  q_len = q_BTHD.shape[1]
  scale, bq, q_pad, bk, k_pad, slopes_KG = _prepare(
      q_BTHD, k_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids, alibi_slopes,
      scale, block_q, block_k)
  args = _pad_inputs(q_BTHD, k_BSKD, v_BSKD, q_positions, k_positions, q_segment_ids,
                     k_segment_ids, q_pad, k_pad)
  out = _attention_core(*args, slopes_KG, pattern, scale, bq, bk)
  return out[:, :q_len]


def blockwise_forward(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids,
                      k_segment_ids, pattern, alibi_slopes=None, scale=None, block_q=None,
                      block_k=None):
  """Forward only (no custom gradient) -> (out float32 [B,T,H,D], lse float32 [B,T,H]).

  lse = -inf (and out = 0) for rows that see no key. Partial results over disjoint key shards
  merge with `combine_partials` (ring attention).
  """
  batch, q_len, num_heads, head_dim = q_BTHD.shape
  scale, bq, q_pad, bk, k_pad, slopes_KG = _prepare(
      q_BTHD, k_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids, alibi_slopes,
      scale, block_q, block_k)
  q, k, v, q_pos, k_pos, q_seg, k_seg = _pad_inputs(
      q_BTHD, k_BSKD, v_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids, q_pad,
      k_pad)
  out, lse = _forward_blocks(_group(q, k.shape[2]), k, v, q_pos, k_pos, q_seg, k_seg, slopes_KG,
                             pattern=pattern, scale=scale, block_q=bq, block_k=bk)
  out = out.reshape(batch, q_pad, num_heads, head_dim)[:, :q_len]
  return out, lse.reshape(batch, q_pad, num_heads)[:, :q_len]


def blockwise_backward(q_BTHD, k_BSKD, v_BSKD, out_BTHD, lse_BTH, d_out_BTHD, *, q_positions,
                       k_positions, q_segment_ids, k_segment_ids, pattern, alibi_slopes=None,
                       scale=None, block_q=None, block_k=None, delta_BTH=None):
  """Backward of attention over this key shard given the GLOBAL out / lse (ring attention).

  Returns float32 (dq [B,T,H,D] — this shard's contribution —, dk, dv [B,S,K,D]).
  delta = rowsum(dO * O) may be passed precomputed (it is shard-independent).
  """
  batch, q_len, num_heads, head_dim = q_BTHD.shape
  kv_len, num_kv = k_BSKD.shape[1], k_BSKD.shape[2]
  scale, bq, q_pad, bk, k_pad, slopes_KG = _prepare(
      q_BTHD, k_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids, alibi_slopes,
      scale, block_q, block_k)
  if delta_BTH is None:
    delta_BTH = jnp.sum(d_out_BTHD.astype(_F32) * out_BTHD.astype(_F32), axis=-1)
  q, k, v, q_pos, k_pos, q_seg, k_seg = _pad_inputs(
      q_BTHD, k_BSKD, v_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids, q_pad,
      k_pad)
  pad_rows = lambda x: jnp.pad(x, [(0, 0), (0, q_pad - q_len)] + [(0, 0)] * (x.ndim - 2))
  group = num_heads // num_kv
  lse = pad_rows(lse_BTH.astype(_F32)).reshape(batch, q_pad, num_kv, group)
  delta = pad_rows(delta_BTH.astype(_F32)).reshape(batch, q_pad, num_kv, group)
  dq, dk, dv = _backward_from_residuals(q, k, v, None, lse, pad_rows(d_out_BTHD), q_pos, k_pos,
                                        q_seg, k_seg, slopes_KG, pattern, scale, bq, bk,
                                        delta_BTKG=delta)
  return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]


def schedule_for(q_positions, k_positions, q_segment_ids, k_segment_ids, *, pattern,
                 block_q=None, block_k=None):
  """The visit schedule `blockwise_attention` would use for these inputs (debug/tests).

  Block sizes resolved as the kernel does (defaults, padding); returns bool [n_q, n_k].
  """
  bq, q_pad = choose_block(q_positions.shape[1], block_q, DEFAULT_BLOCK_Q, "block_q")
  bk, k_pad = choose_block(k_positions.shape[1], block_k, DEFAULT_BLOCK_K, "block_k")
  if (q_pad, k_pad) != (q_positions.shape[1], k_positions.shape[1]):
    dummy_q = jnp.zeros(q_positions.shape + (1,), _F32)
    dummy_k = jnp.zeros(k_positions.shape + (1,), _F32)
    _, _, _, q_positions, k_positions, q_segment_ids, k_segment_ids = _pad_inputs(
        dummy_q, dummy_k, dummy_k, q_positions, k_positions, q_segment_ids, k_segment_ids,
        q_pad, k_pad)
  return visit_schedule(q_positions, k_positions, q_segment_ids, k_segment_ids,
                        pattern=pattern, block_q=bq, block_k=bk)

