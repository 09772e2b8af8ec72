"""Blockwise (memory-efficient / flash-style) attention that computes only visible block pairs.

Rabe & Staats 2021 (self-attention does not need O(n^2) memory) and Dao et al. 2022
(FlashAttention, Algorithm 1; its backward as FlashAttention-2, Dao 2023, Algorithm 2). Same
contract as `reference`: float32 scores and softmax whatever the input dtype, grouped-query
attention by viewing queries as [batch, kv_heads, group, ...] (query head h reads kv head
h // group), a query sees only keys of its own segment, ALiBi = -slope_h*(q_pos - k_pos) from
GLOBAL positions (Press et al. 2022), and a row with no visible key outputs 0.

Algorithm
  * Queries are cut into blocks of `block_q`, keys/values into blocks of `block_k` (blocks.py).
    Each query block keeps an online-softmax state (running max m, denominator l, f32
    accumulator) and folds its visible key blocks in one at a time (online_softmax.py).
  * Visit lists. Positions are data, so which (query block, key block) pairs can hold a visible
    pair is decided at run time from each block's min/max position (`pattern.block_visible`)
    and min/max segment id (ranges must overlap): the bool [n_q, n_k] `visit_schedule`. It is
    compacted into per-row lists (`visit_lists`: the visible key blocks of each query block, in
    order, and their count), and the kernel loops over exactly those — a `fori_loop` with a
    data-dependent trip count that fetches each key block by dynamic index. The backward loops
    over the transposed lists (for each key block, the query blocks that see it) and adds dq into
    its query block in place. So the work is the number of visible block pairs, whatever the
    pattern, positions or packing: causal n(n+1)/2, a window of w ~ n(w/block + 2), Lambda
    (n_global sinks + n_local window) ~ n(n_local/block + 3), packed documents no cross-document
    pair — no assumption on the position layout (the per-pair mask is applied inside every
    visited pair, so the result is exact for any positions). Building the lists costs O(n_q n_k)
    vectorised bool work, negligible next to a block pair. A pair is skipped only when it is
    invisible for every batch row (batch rows share one loop).
  * Gradient: `jax.custom_vjp`. The forward saves only (q, k, v, out, lse); the backward
    recomputes each visible block's scores, P = exp(S - lse), and accumulates dq, dk, dv
    (dS = P * (dP - rowsum(dO * O))). Activation memory is linear in T. The loops have
    data-dependent trip counts, so `_forward_blocks` is not reverse-differentiable by itself:
    gradients go through the custom_vjp (`blockwise_attention`, `partial.attend_with_lse`,
    ring's own custom_vjp).

Building blocks for other kernels. The loops work on the blocked layout and carry their state,
so a caller can feed key shards one after the other: `fold_key_blocks` (forward: online-softmax
state across shards) and `backward_key_blocks` (gradients added in place); the ring's variants
that hand each key block on once used are in ring_loops.py (they share `key_block_backward`).
Partial attention (partial.attend_with_lse) uses `blockwise_forward` -> (out [B,T,H,D],
lse [B,T,H]; lse = -inf for rows that see no key) and `blockwise_backward` (a key shard's
gradient given the GLOBAL out / lse).

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

import jax
import jax.numpy as jnp
from jax import lax

from ctxjax.attention.api import register_implementation
from ctxjax.attention.blocks import (  # noqa: F401  (re-exported: tests, benchmarks)
    KeyBlocks, QueryBlocks, RowGrads, block_schedule, count_visits, key_blocks, kv_unblocks,
    put_blocks, q_unblocks, query_blocks, row_grads, stat_blocks, stat_unblocks, take_blocks,
    visit_lists, visit_schedule)
from ctxjax.attention.online_softmax import (  # noqa: F401  (re-exported: ring, dilated, tests)
    SoftmaxState, block_backward, block_logits, combine_partials, finalize_state, init_state,
    merge_partials, online_softmax_update, vary_like)
from ctxjax.attention.shapes import pad_rows

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256
MIN_AUTO_BLOCK = 128

_F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Block sizes
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


# ----------------------------------------------------------------------------------------------
# Block loops (state and gradients are carried across calls: the ring feeds shard after shard)
# ----------------------------------------------------------------------------------------------

def init_blocked_state(qb: QueryBlocks, *vary_refs) -> SoftmaxState:
  """Empty online-softmax state of every query block: [n_q, B, K, G, bq(, D)]."""
  return init_state(qb.q, qb.pos, qb.seg, *vary_refs)


def fold_key_blocks(state: SoftmaxState, qb: QueryBlocks, kb: KeyBlocks, *, pattern, scale,
                    alibi_slopes_KG=None) -> SoftmaxState:
  """Fold every visible key block of `kb` into the blocked state of `qb` (forward).

  Query-major: for query block i, loop over its visit list (a data-dependent trip count) and
  fetch each key block by index; the state is updated in place. `finalize_state` -> out, lse.
  """
  cols, count = visit_lists(block_schedule(qb.pos, qb.seg, kb.pos, kb.seg, pattern=pattern))
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=alibi_slopes_KG)

  def q_step(i, state):
    q_i, qp_i, qs_i = take_blocks(qb, i)

    def visit(t, st):  # the t-th visible key block of query block i
      k_j, v_j, kp_j, ks_j = take_blocks(kb, cols[i, t])
      return online_softmax_update(st, q_i, k_j, v_j, qp_i, kp_j, qs_i, ks_j, **kw)

    state_i = lax.fori_loop(0, count[i], visit, SoftmaxState(*take_blocks(state, i)))
    return SoftmaxState(*put_blocks(state, state_i, i))

  return lax.fori_loop(0, qb.q.shape[0], q_step, state)


def key_major_lists(qb: QueryBlocks, kb: KeyBlocks, pattern):
  """For each key block, the query blocks that see it: (rows int32 [n_k, n_q], count [n_k])."""
  return visit_lists(block_schedule(qb.pos, qb.seg, kb.pos, kb.seg, pattern=pattern).T)


def key_block_backward(carry, key_block_j, j, rows, count, qb: QueryBlocks, rg: RowGrads, *,
                       pattern, scale, alibi_slopes_KG=None):
  """Add the gradients of key block j's visible pairs: carry = (dk_j, dv_j, dq) float32 ->
  the same, dq [n_q, ...] updated in place. Blocks are cast to float32 as they are used."""
  k_j, v_j, kp_j, ks_j = key_block_j
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=alibi_slopes_KG)

  def visit(t, carry):  # the t-th query block that sees key block j
    dk_j, dv_j, dq = carry
    i = rows[j, t]
    (q_i, qp_i, qs_i), (do_i, lse_i, delta_i) = take_blocks(qb, i), take_blocks(rg, i)
    dq_i, dk_ij, dv_ij = block_backward(q_i.astype(_F32), k_j.astype(_F32), v_j.astype(_F32),
                                        do_i, lse_i, delta_i, qp_i, kp_j, qs_i, ks_j, **kw)
    (dq_old,) = take_blocks((dq,), i)
    (dq,) = put_blocks((dq,), (dq_old + dq_i,), i)
    return dk_j + dk_ij, dv_j + dv_ij, dq

  return lax.fori_loop(0, count[j], visit, carry)


def backward_key_blocks(grads, qb: QueryBlocks, rg: RowGrads, kb: KeyBlocks, *, pattern, scale,
                        alibi_slopes_KG=None):
  """Add the gradient of every visible block pair to grads = (dq [n_q, B,K,G,bq,D],
  dk, dv [n_k, B,K,bk,D]) float32, blocked (backward; lse / delta must be the GLOBAL ones).
  q / k / v blocks may be in a narrower dtype: each block is cast to float32 as it is used.

  Key-major: for key block j, loop over the query blocks that see it (the transposed visit
  lists), accumulating its dk/dv in the loop carry and adding dq into query block i in place.
  """
  rows, count = key_major_lists(qb, kb, pattern)
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=alibi_slopes_KG)

  def k_step(j, grads):
    dq, dk, dv = grads
    key_block_j = take_blocks(kb, j)
    dk_j, dv_j = take_blocks((dk, dv), j)
    dk_j, dv_j, dq = key_block_backward((dk_j, dv_j, dq), key_block_j, j, rows, count, qb, rg,
                                        **kw)
    dk, dv = put_blocks((dk, dv), (dk_j, dv_j), j)
    return dq, dk, dv

  return lax.fori_loop(0, kb.k.shape[0], k_step, tuple(grads))


def zeros_grads(qb: QueryBlocks, kb: KeyBlocks, rg: RowGrads, *vary_refs):
  """float32 zeros (dq, dk, dv) in the blocked layout, typed like the inputs under shard_map.

  Computed from delta (delta = rowsum(dO * O) exists only once the forward is done) as
  float(delta[0] > inf), which is 0 for every float, NaN included: a constant zero would be
  hoisted by XLA to the start of a fused forward+backward program and shared with the forward's
  zero-initialised state, costing live shard-sized buffers (and copies) through the forward.
  """
  zero = (jnp.ravel(rg.delta)[0] > jnp.inf).astype(_F32)
  z = lambda x: vary_like(jnp.broadcast_to(zero, x.shape), *qb, *kb, *rg, *vary_refs)
  return z(qb.q), z(kb.k), z(kb.v)


def _forward_blocks(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes_KG, *, pattern, scale, block_q,
                    block_k):
  """q [B,T,K,G,D], k/v [B,S,K,D] -> out f32 [B,T,K,G,D], lse f32 [B,T,K,G]."""
  qb = query_blocks(q, q_pos, q_seg, block_q)
  kb = key_blocks(k, v, k_pos, k_seg, block_k)
  state = fold_key_blocks(init_blocked_state(qb, *kb, slopes_KG), qb, kb, pattern=pattern,
                          scale=scale, alibi_slopes_KG=slopes_KG)
  out, lse = finalize_state(state)
  return q_unblocks(out), stat_unblocks(lse)


def _backward_blocks(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, slopes_KG, *, pattern,
                     scale, block_q, block_k):
  """float32 q/do [B,T,K,G,D], k/v [B,S,K,D], lse/delta [B,T,K,G] -> float32 dq, dk, dv."""
  qb = query_blocks(q, q_pos, q_seg, block_q)
  kb = key_blocks(k, v, k_pos, k_seg, block_k)
  rg = row_grads(do, lse, delta, block_q)
  dq, dk, dv = backward_key_blocks(zeros_grads(qb, kb, rg, slopes_KG), qb, rg, kb,
                                   pattern=pattern, scale=scale, alibi_slopes_KG=slopes_KG)
  return q_unblocks(dq), kv_unblocks(dk), kv_unblocks(dv)


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

def _prepare(q_BTHD, k_BSKD, alibi_slopes, scale, block_q, block_k):
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
  if q_pad == q.shape[1] and k_pad == k.shape[1]:
    return q, k, v, q_pos, k_pos, q_seg, k_seg
  sentinel = jnp.minimum(q_seg.min(), k_seg.min()) - 1
  return (pad_rows(q, q_pad), pad_rows(k, k_pad), pad_rows(v, k_pad),
          pad_rows(q_pos, q_pad, q_pos[:, -1:]), pad_rows(k_pos, k_pad, k_pos[:, -1:]),
          pad_rows(q_seg, q_pad, sentinel), pad_rows(k_seg, k_pad, sentinel))


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
  scale, bq, q_pad, bk, k_pad, slopes_KG = _prepare(q_BTHD, k_BSKD, alibi_slopes, scale,
                                                    block_q, block_k)
  args = _pad_inputs(q_BTHD, k_BSKD, v_BSKD, q_positions, k_positions, q_segment_ids,
                     k_segment_ids, q_pad, k_pad)
  out = _attention_core(*args, slopes_KG, pattern, scale, bq, bk)
  return out[:, :q_len]


def blockwise_forward(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids,
                      k_segment_ids, pattern, alibi_slopes=None, scale=None, block_q=None,
                      block_k=None):
  """Forward only (no custom gradient) -> (out float32 [B,T,H,D], lse float32 [B,T,H]).

  lse = -inf (and out = 0) for rows that see no key. Partial results over disjoint key shards
  merge with `combine_partials` / `merge_partials`.
  """
  batch, q_len, num_heads, head_dim = q_BTHD.shape
  scale, bq, q_pad, bk, k_pad, slopes_KG = _prepare(q_BTHD, k_BSKD, alibi_slopes, scale,
                                                    block_q, block_k)
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
  """Backward of attention over this key shard given the GLOBAL out / lse (partial attention).

  Returns float32 (dq [B,T,H,D] — this shard's contribution —, dk, dv [B,S,K,D]).
  delta = rowsum(dO * O) may be passed precomputed (it is shard-independent).
  """
  batch, q_len, num_heads, head_dim = q_BTHD.shape
  kv_len, num_kv = k_BSKD.shape[1], k_BSKD.shape[2]
  scale, bq, q_pad, bk, k_pad, slopes_KG = _prepare(q_BTHD, k_BSKD, alibi_slopes, scale,
                                                    block_q, block_k)
  if delta_BTH is None:
    delta_BTH = jnp.sum(d_out_BTHD.astype(_F32) * out_BTHD.astype(_F32), axis=-1)
  q, k, v, q_pos, k_pos, q_seg, k_seg = _pad_inputs(
      q_BTHD, k_BSKD, v_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids, q_pad,
      k_pad)
  group = num_heads // num_kv
  lse = pad_rows(lse_BTH.astype(_F32), q_pad).reshape(batch, q_pad, num_kv, group)
  delta = pad_rows(delta_BTH.astype(_F32), q_pad).reshape(batch, q_pad, num_kv, group)
  dq, dk, dv = _backward_from_residuals(q, k, v, None, lse, pad_rows(d_out_BTHD, q_pad), q_pos,
                                        k_pos, q_seg, k_seg, slopes_KG, pattern, scale, bq, bk,
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
