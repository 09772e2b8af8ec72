"""The blocked layout and the visit schedule shared by the blockwise and ring kernels.

Blocked layout: a leading block axis, so a loop reads block i by dynamic index (`take_blocks`)
and writes it in place (`put_blocks`). Visit schedule: which (query block, key block) pairs can
hold a visible pair, decided at run time from each block's position and segment-id ranges
(`pattern.block_visible`), compacted into per-row lists the kernels loop over (blockwise.py
describes the algorithm; Rabe & Staats 2021, Dao et al. 2022).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ctxjax.attention.patterns import Pattern


# ----------------------------------------------------------------------------------------------
# Blocked layout: a leading block axis, so a loop reads block i by dynamic index
# ----------------------------------------------------------------------------------------------

class QueryBlocks(NamedTuple):
  q: jax.Array    # [n_q, B, K, G, bq, D]
  pos: jax.Array  # int [n_q, B, bq]: GLOBAL positions
  seg: jax.Array  # int [n_q, B, bq]: segment ids


class KeyBlocks(NamedTuple):
  k: jax.Array    # [n_k, B, K, bk, D]
  v: jax.Array    # [n_k, B, K, bk, D]
  pos: jax.Array  # int [n_k, B, bk]
  seg: jax.Array  # int [n_k, B, bk]


class RowGrads(NamedTuple):
  """What the backward reads per query row: the output cotangent and the GLOBAL statistics."""
  do: jax.Array     # float32 [n_q, B, K, G, bq, D]
  lse: jax.Array    # float32 [n_q, B, K, G, bq]
  delta: jax.Array  # float32 [n_q, B, K, G, bq]: rowsum(dO * O) (minus any lse cotangent)


def _q_blocks(x_BTKGD, block):
  """[B, T, K, G, D] -> [n, B, K, G, block, D]."""
  b, t, k, g, d = x_BTKGD.shape
  return x_BTKGD.reshape(b, t // block, block, k, g, d).transpose(1, 0, 3, 4, 2, 5)


def q_unblocks(x_nBKGbD):
  """[n, B, K, G, block, D] -> [B, T, K, G, D]."""
  n, b, k, g, blk, d = x_nBKGbD.shape
  return x_nBKGbD.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * blk, k, g, d)


def _kv_blocks(x_BSKD, block):
  """[B, S, K, D] -> [n, B, K, block, D]."""
  b, s, k, d = x_BSKD.shape
  return x_BSKD.reshape(b, s // block, block, k, d).transpose(1, 0, 3, 2, 4)


def kv_unblocks(x_nBKbD):
  """[n, B, K, block, D] -> [B, S, K, D]."""
  n, b, k, blk, d = x_nBKbD.shape
  return x_nBKbD.transpose(1, 0, 3, 2, 4).reshape(b, n * blk, k, d)


def _row_blocks(x_BT, block):
  """[B, T] -> [n, B, block]."""
  b, t = x_BT.shape
  return x_BT.reshape(b, t // block, block).transpose(1, 0, 2)


def stat_blocks(x_BTKG, block):
  """[B, T, K, G] -> [n, B, K, G, block]."""
  b, t, k, g = x_BTKG.shape
  return x_BTKG.reshape(b, t // block, block, k, g).transpose(1, 0, 3, 4, 2)


def stat_unblocks(x_nBKGb):
  """[n, B, K, G, block] -> [B, T, K, G]."""
  n, b, k, g, blk = x_nBKGb.shape
  return x_nBKGb.transpose(1, 0, 4, 2, 3).reshape(b, n * blk, k, g)


def query_blocks(q_BTKGD, positions_BT, segment_ids_BT, block) -> QueryBlocks:
  return QueryBlocks(_q_blocks(q_BTKGD, block), _row_blocks(positions_BT, block),
                     _row_blocks(segment_ids_BT, block))


def key_blocks(k_BSKD, v_BSKD, positions_BS, segment_ids_BS, block) -> KeyBlocks:
  return KeyBlocks(_kv_blocks(k_BSKD, block), _kv_blocks(v_BSKD, block),
                   _row_blocks(positions_BS, block), _row_blocks(segment_ids_BS, block))


def row_grads(do_BTKGD, lse_BTKG, delta_BTKG, block) -> RowGrads:
  return RowGrads(_q_blocks(do_BTKGD, block), stat_blocks(lse_BTKG, block),
                  stat_blocks(delta_BTKG, block))


# ----------------------------------------------------------------------------------------------
# The visit schedule and its lists
# ----------------------------------------------------------------------------------------------

def block_schedule(q_pos_nBb, q_seg_nBb, k_pos_nBb, k_seg_nBb, *, pattern: Pattern):
  """Bool [n_q, n_k] from blocked positions / segment ids ([n, B, block]); see visit_schedule."""
  lo_hi = lambda x: (x.min(-1), x.max(-1))  # [n, B] each
  (q_lo, q_hi), (k_lo, k_hi) = lo_hi(q_pos_nBb), lo_hi(k_pos_nBb)
  (qs_lo, qs_hi), (ks_lo, ks_hi) = lo_hi(q_seg_nBb), lo_hi(k_seg_nBb)
  e = lambda x: x[:, None, :]  # query blocks on axis 0
  f = lambda x: x[None, :, :]  # key blocks on axis 1
  vis = jnp.asarray(pattern.block_visible(e(q_lo), e(q_hi), f(k_lo), f(k_hi)))
  vis = jnp.broadcast_to(vis, (q_lo.shape[0], k_lo.shape[0], q_lo.shape[1]))
  vis &= (e(qs_lo) <= f(ks_hi)) & (f(ks_lo) <= e(qs_hi))
  return vis.any(axis=-1)


def visit_schedule(q_positions, k_positions, q_segment_ids, k_segment_ids, *, pattern: Pattern,
                   block_q: int, block_k: int):
  """Bool [n_q, n_k]: which (query block, key block) pairs the kernel computes.

  A pair is visited iff, for some batch row, `pattern.block_visible` holds on the blocks'
  position ranges AND their segment-id ranges overlap. Everything else is never computed, in
  forward and backward (the kernel loops over `visit_lists` of this schedule).
  """
  return block_schedule(_row_blocks(q_positions, block_q), _row_blocks(q_segment_ids, block_q),
                        _row_blocks(k_positions, block_k), _row_blocks(k_segment_ids, block_k),
                        pattern=pattern)


def visit_lists(schedule):
  """Compact a bool [rows, cols] schedule into the lists the kernel's loops run over.

  -> (cols int32 [rows, cols]: row r's visited columns in increasing order, then the others
  (never read); count int32 [rows]: how many are visited). The forward uses the schedule's
  lists (key blocks per query block), the backward those of its transpose.
  """
  count = schedule.sum(axis=1, dtype=jnp.int32)
  cols = jnp.argsort(jnp.logical_not(schedule), axis=1, stable=True).astype(jnp.int32)
  return cols, count


def count_visits(q_positions, k_positions, q_segment_ids, k_segment_ids, *, pattern: Pattern,
                 block_q: int, block_k: int) -> int:
  """Number of block pairs the kernel computes (forward; the backward visits the same)."""
  _, count = visit_lists(visit_schedule(q_positions, k_positions, q_segment_ids, k_segment_ids,
                                        pattern=pattern, block_q=block_q, block_k=block_k))
  return int(count.sum())



# ----------------------------------------------------------------------------------------------
# Reading and writing one block of a stacked array (inside loops)
# ----------------------------------------------------------------------------------------------

def take_blocks(blocks, index):
  """The `index`-th block of each stacked [n, ...] array (dynamic index: one block copied)."""
  return tuple(lax.dynamic_index_in_dim(x, index, 0, keepdims=False) for x in blocks)


def put_blocks(blocks, values, index):
  """Write one block into each stacked array (in place inside a loop carry)."""
  return tuple(lax.dynamic_update_index_in_dim(x, y, index, 0) for x, y in zip(blocks, values))

