"""Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers"): each device
keeps its query shard while the K/V shard, with its positions and segment ids, travels round the
ring with `lax.ppermute` (n steps), in blockwise's blocked layout (blocked once per call).

Call INSIDE `jax.shard_map` over the sequence axis (context_parallel.py wraps it, and registers
it as the "ring" strategy); positions and segment ids are GLOBAL data that travel with their
tokens, so masks and ALiBi are exact under any token layout (layouts.py: contiguous, zigzag, or
striped, Brandon et al. 2023).

The forward is ONE online softmax over the ring (that of Dao et al. 2022, FlashAttention): the
local queries' blocked state (running max, denominator, float32 accumulator) is carried across
the steps; at each step the shard in hand is folded in key block by key block
(`ring_loops.fold_and_pass_key_blocks`, only visible block pairs are computed) and each key
block is handed to the next device once it has been used — so one key block per array is in
flight, never a second shard, and (sent when the block pair's score temporaries are dead) it
reuses their memory. After n steps every shard is home again, and that copy is the backward's
residual (no second blocked copy of K/V). Gradient: `jax.custom_vjp`; the backward replays the
ring, the float32 dK/dV accumulators travelling with their K/V block by block
(`ring_loops.backward_and_pass_key_blocks`), with the GLOBAL lse and delta = rowsum(dO * O) (as
haoliuhl/ringattention); blocks are cast to float32 as they are used, so bf16 K/V travel as
bf16.

Per-device memory: that of blockwise at the local length, plus the ring's travelling copy of the
key positions and segment ids. Compiled fwd+bwd (8 heads x 64, fp32, causal, zigzag): ring on 8
devices at T = 16K needs 1.0004x the per-device memory of blockwise on one device at 2K
(+25 KB); an overlapped whole-shard ring needed 1.25x (benchmarks/attention_ring.py).

Block sizes inside a shard pair: blockwise's automatic choice (`context_parallel.auto_block`); a
shard with no divisor in range is padded, the padded tokens getting segment ids below every real
one on the axis (`_pad_ids`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ctxjax.attention import blockwise as bw
from ctxjax.attention.context_parallel import (DEFAULT_AXIS, STRATEGIES, auto_block, axis_size,
                                               check_local)
from ctxjax.attention.ring_loops import backward_and_pass_key_blocks, fold_and_pass_key_blocks
from ctxjax.attention.shapes import pad_rows

_F32 = jnp.float32


def _pad_ids(q_seg, k_seg, axis_name):
  """Segment ids for padded queries / keys: below every real id on the whole axis, so padded
  queries see no key and padded keys reach no query — also after travelling to another device."""
  base = lax.pmin(jnp.minimum(q_seg.min(), k_seg.min()), axis_name)
  return base - 1, base - 2


def _blocked_queries(q, q_pos, q_seg, k_seg, num_kv, axis_name, block_q):
  """Local query shard -> (bw.QueryBlocks, block, padding rows). A shard with no automatic block
  divisor is padded as blockwise does."""
  tq = q.shape[1]
  bq, q_pad = bw.choose_block(tq, block_q, bw.DEFAULT_BLOCK_Q, "block_q")
  if q_pad != tq:
    q_fill, _ = _pad_ids(q_seg, k_seg, axis_name)
    q, q_pos, q_seg = (pad_rows(q, q_pad, 0), pad_rows(q_pos, q_pad, q_pos[:, -1:]),
                       pad_rows(q_seg, q_pad, q_fill))
  qg = q.reshape(q.shape[:2] + (num_kv, q.shape[2] // num_kv, q.shape[3]))
  return bw.query_blocks(qg, q_pos, q_seg, bq), bq, q_pad - tq


def _blocked_keys(k, v, k_pos, q_seg, k_seg, axis_name, block_k):
  """Local K/V shard -> bw.KeyBlocks (padded like the queries, see `_pad_ids`)."""
  tk = k.shape[1]
  bk, k_pad = bw.choose_block(tk, block_k, bw.DEFAULT_BLOCK_K, "block_k")
  if k_pad != tk:
    _, k_fill = _pad_ids(q_seg, k_seg, axis_name)
    k, v = pad_rows(k, k_pad, 0), pad_rows(v, k_pad, 0)
    k_pos, k_seg = pad_rows(k_pos, k_pad, k_pos[:, -1:]), pad_rows(k_seg, k_pad, k_fill)
  return bw.key_blocks(k, v, k_pos, k_seg, bk)


def _slopes_KG(slopes, q, num_kv):
  return None if slopes is None else slopes.reshape(num_kv, q.shape[2] // num_kv)


def _pass_on(axis_name):
  """Send blocks to the next device on the ring (device j -> j + 1 mod n)."""
  n = axis_size(axis_name)
  perm = [(j, (j + 1) % n) for j in range(n)]
  return lambda blocks: jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), blocks)


def _ring_fwd_pass(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale, axis_name,
                   block_q, block_k):
  """-> (out float32 [B,T,H,D], lse float32 [B,T,H] over the keys of every device,
  kb: this device's K/V shard in the blocked layout, home again after n hops).

  One online softmax over the whole ring, the K/V blocks passed on as they are used (see the
  module docstring); after the n-th step every shard is back on its owner, and the backward
  starts from that copy (the residual), so XLA keeps no second blocked copy of K/V.
  """
  n = axis_size(axis_name)
  qb, _, q_extra = _blocked_queries(q, q_pos, q_seg, k_seg, k.shape[2], axis_name, block_q)
  kb = _blocked_keys(k, v, k_pos, q_seg, k_seg, axis_name, block_k)
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=_slopes_KG(slopes, q, k.shape[2]))
  pass_block = _pass_on(axis_name)

  def step(carry, _):
    state, kb_t = carry
    return fold_and_pass_key_blocks(state, qb, kb_t, pass_block=pass_block, **kw), None

  state0 = bw.init_blocked_state(qb, *kb, slopes)
  (state, kb_home), _ = lax.scan(step, (state0, kb), None, length=n)
  out, lse = bw.finalize_state(state)
  b, t, h, d = q.shape
  out = bw.q_unblocks(out).reshape(b, t + q_extra, h, d)[:, :t]
  return out, bw.stat_unblocks(lse).reshape(b, t + q_extra, h)[:, :t], kb_home


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _ring_core(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale, axis_name, block_q,
               block_k):
  out, _, _ = _ring_fwd_pass(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale,
                             axis_name, block_q, block_k)
  return out.astype(q.dtype)


def _ring_core_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale, axis_name,
                   block_q, block_k):
  out, lse, kb = _ring_fwd_pass(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale,
                                axis_name, block_q, block_k)
  out = out.astype(q.dtype)
  return out, (q, kb, out, lse, q_pos, k_pos, q_seg, k_seg, slopes)


def _ring_core_bwd(pattern, scale, axis_name, block_q, block_k, res, d_out):
  """Replay the ring: K/V travel as in the forward and their float32 dK/dV accumulators travel
  with them, block by block as each is done (after n hops they are back on the owning
  device); dq stays local. Each step adds the visible block pairs' gradients in place
  (`ring_loops.backward_and_pass_key_blocks`) with the GLOBAL lse and delta = rowsum(dO * O) (as
  haoliuhl/ringattention). Blocks are cast to float32 as they are used."""
  q, kb, out, lse, q_pos, k_pos, q_seg, k_seg, slopes = res
  b, t, h, d = q.shape
  tk, num_kv = k_pos.shape[1], kb.k.shape[2]
  qb, bq, q_extra = _blocked_queries(q, q_pos, q_seg, k_seg, num_kv, axis_name, block_q)
  f32 = lambda x: x.astype(_F32)
  delta = jnp.sum(f32(d_out) * f32(out), axis=-1)  # global: the same at every step
  grouped = lambda x: pad_rows(x, t + q_extra).reshape((b, t + q_extra, num_kv, -1)
                                                       + x.shape[3:])
  rg = bw.row_grads(grouped(f32(d_out)), grouped(f32(lse)), grouped(delta), bq)
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=_slopes_KG(slopes, q, num_kv))
  pass_block = _pass_on(axis_name)

  def step(carry, _):
    dq, kb_t, dk, dv = carry
    dq, dk, dv, kb_t = backward_and_pass_key_blocks((dq, dk, dv), qb, rg, kb_t,
                                                    pass_block=pass_block, **kw)
    return (dq, kb_t, dk, dv), None

  dq0, dk0, dv0 = bw.zeros_grads(qb, kb, rg, slopes)
  (dq, _, dk, dv), _ = lax.scan(step, (dq0, kb, dk0, dv0), None,
                                length=axis_size(axis_name))
  dq = bw.q_unblocks(dq).reshape(b, t + q_extra, h, d)[:, :t]
  dk, dv = (bw.kv_unblocks(x)[:, :tk] for x in (dk, dv))
  d_slopes = None if slopes is None else jnp.zeros_like(slopes)
  return (dq.astype(q.dtype), dk.astype(kb.k.dtype), dv.astype(kb.v.dtype), None, None, None,
          None, d_slopes)


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


@STRATEGIES.register("ring")
def ring_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                   alibi_slopes=None, scale=None, axis_name: str = DEFAULT_AXIS, block_q=None,
                   block_k=None):
  """Ring attention over mesh axis `axis_name`; call INSIDE shard_map (local shards).

  Same arguments as `attend` (local shards; positions / segment ids GLOBAL values), plus the
  axis and the blockwise block sizes used within one shard pair (None = automatic). Returns the
  local output shard [B, Tq/n, H, D] in q's dtype. ALiBi slopes are constants (zero cotangent).
  Works inside shard_map with check_vma=True or False.
  """
  check_local(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, axis_name)
  head_dim = q.shape[-1]
  scale = head_dim ** -0.5 if scale is None else float(scale)
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, _F32)
  return _ring_core(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, slopes,
                    pattern, scale, axis_name, auto_block(q.shape[1], block_q),
                    auto_block(k.shape[1], block_k))
