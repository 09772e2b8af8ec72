"""The ring kernel's block loops: blockwise's loops, key-major, handing each key block on to the
next device as soon as it has been used (Ring Attention, Liu et al. 2023: sending key blocks
overlaps the blockwise computation).

Only one block per array is in flight, instead of a whole shard, and it is read for sending only
after its use (`_index_after`), when the block pairs' score temporaries are dead, so the copies
in flight reuse their memory. Each query block still folds its key blocks in increasing order,
so the results equal blockwise's plain loops bit for bit. `pass_block` (the ring's ppermute)
runs n_k times whatever the visit lists: collectives must be uniform across devices.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ctxjax.attention.blocks import KeyBlocks, QueryBlocks, RowGrads, put_blocks, take_blocks
from ctxjax.attention.blockwise import key_block_backward, key_major_lists
from ctxjax.attention.online_softmax import SoftmaxState, online_softmax_update


def _index_after(index, x):
  """`index`, computed from `x` (x[0] > inf is False for every float, NaN included), so that
  what is read at it is read only once `x` exists: a data dependency that orders the ring's
  sends after the block's use, which XLA:CPU keeps (it drops optimization_barrier)."""
  return index + (jnp.ravel(x)[0] > jnp.inf).astype(jnp.int32)


def fold_and_pass_key_blocks(state: SoftmaxState, qb: QueryBlocks, kb: KeyBlocks, *, pass_block,
                             pattern, scale, alibi_slopes_KG=None):
  """`blockwise.fold_key_blocks`, key-major, handing each key block on once used.

  For key block j: fold it into every query block that sees it (the transposed visit lists),
  then replace slot j of `kb` with `pass_block(KeyBlocks of block j)`.
  -> (state, kb holding the passed blocks).
  """
  rows, count = key_major_lists(qb, kb, pattern)
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=alibi_slopes_KG)

  def k_step(j, carry):
    state, kb = carry
    k_j, v_j, kp_j, ks_j = take_blocks(kb, j)

    def visit(t, state):  # the t-th query block that sees key block j
      i = rows[j, t]
      q_i, qp_i, qs_i = take_blocks(qb, i)
      state_i = online_softmax_update(SoftmaxState(*take_blocks(state, i)), q_i, k_j, v_j, qp_i,
                                      kp_j, qs_i, ks_j, **kw)
      return SoftmaxState(*put_blocks(state, state_i, i))

    state = lax.fori_loop(0, count[j], visit, state)
    block_j = KeyBlocks(*take_blocks(kb, _index_after(j, state.m)))
    return state, KeyBlocks(*put_blocks(kb, pass_block(block_j), j))

  return lax.fori_loop(0, kb.k.shape[0], k_step, (state, kb))


def backward_and_pass_key_blocks(grads, qb: QueryBlocks, rg: RowGrads, kb: KeyBlocks, *,
                                 pass_block, pattern, scale, alibi_slopes_KG=None):
  """`blockwise.backward_key_blocks`, handing each key block and its float32 dK/dV on once
  done: `pass_block((KeyBlocks of block j, dk_j, dv_j))` replaces their slots in kb, dk, dv.
  -> (dq, dk, dv, kb holding the passed blocks)."""
  rows, count = key_major_lists(qb, kb, pattern)
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=alibi_slopes_KG)

  def k_step(j, carry):
    dq, dk, dv, kb = carry
    key_block_j = take_blocks(kb, j)
    dk_j, dv_j = take_blocks((dk, dv), j)
    dk_j, dv_j, dq = key_block_backward((dk_j, dv_j, dq), key_block_j, j, rows, count, qb, rg,
                                        **kw)
    block_j = KeyBlocks(*take_blocks(kb, _index_after(j, dk_j)))
    block_j, dk_j, dv_j = pass_block((block_j, dk_j, dv_j))
    dk, dv = put_blocks((dk, dv), (dk_j, dv_j), j)
    return dq, dk, dv, KeyBlocks(*put_blocks(kb, block_j, j))

  return lax.fori_loop(0, kb.k.shape[0], k_step, tuple(grads) + (kb,))
