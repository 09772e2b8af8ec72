"""Landmark attention (Mohtashami & Jaggi 2023): the grouped softmax and top-k block retrieval.

Layout. A row is cut into blocks of `block = mem_freq + 1` slots; the last slot of every block
holds the landmark token (ctxjax/data/landmark.py puts it there), so block and landmark are
known from the slot index alone, as in the paper's fused kernel (block_size = mem_freq + 1).
A partial last block has no landmark yet.

Grouped softmax (paper, Section 3.1, Eq. 2-3). For a query i in block c, with scores
s_ij = q_i . k_j / sqrt(d) over causal keys of its own segment:
  * one softmax over the current block's ordinary tokens j <= i and the landmarks L_b of the
    past blocks b < c (the current block's own landmark is left out, even for the landmark
    query itself): probabilities p_j and p_{L_b};
  * within each past block b, a softmax over its ordinary tokens: g_j = softmax_{j in b}(s_j);
  * weight w_ij = p_j for the current block, p_{L_b} * g_j for a token of past block b, and 0
    for every landmark (its value is never read; its key only gates its block).
out_i = sum_j w_ij v_j. A past block with no visible token contributes nothing (its landmark's
probability mass is dropped, as `landmark_grouped_softmax` does for an empty group).

Retrieval (paper, Section 3.2): at inference each query keeps only the `top_k` past blocks
whose landmark scores are highest (per head), then applies the same grouped softmax to those
blocks plus the current one; with top_k >= the number of past blocks it equals the training
formula exactly. Positions are the true ones (the paper's remapping of retrieved blocks next
to the current block is not implemented).

Two implementations: `landmark_reference` builds the dense [T, T] weights exactly as defined
above (for tests and small inputs); `landmark_blockwise` scans over query blocks, each step
dense over the keys, with `jax.checkpoint` on the step so that forward AND backward hold one
block's [block, T] scores at a time: memory linear in T (no custom_vjp). The paper's cached
inference (Section 3.2: a key/value cache of every slot, landmarks included) decodes with
`landmark_decode`: one query per row against that cache, the blockwise step's arithmetic
(`_block_queries`) for a block of one query; ctxjax/model/landmark_mode.py stores the cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ctxjax.registry import Registry

_NEG = -1e30  # finite "minus infinity": exp underflows to 0 and no NaN from (-inf) - (-inf)


def slot_kinds(length: int, mem_freq: int):
  """(block index, is-landmark) of slots 0..length-1: int [T], bool [T]."""
  return np.arange(length) // (mem_freq + 1), landmark_slots(length, mem_freq)


def landmark_slots(seq_len: int, mem_freq: int) -> np.ndarray:
  """bool [seq_len]: True at the landmark slots."""
  return np.arange(seq_len) % (mem_freq + 1) == mem_freq


def with_landmarks(tokens: np.ndarray, mem_freq: int, landmark_id: int) -> np.ndarray:
  """Content ids [..., n] -> [..., m] with a landmark after every mem_freq tokens, where m is
  the least row length holding n content tokens (a trailing full block gets its landmark)."""
  n = tokens.shape[-1]
  m = n + n // mem_freq
  out = np.full(tokens.shape[:-1] + (m,), landmark_id, tokens.dtype)
  out[..., ~landmark_slots(m, mem_freq)] = tokens
  return out


def _scores(q_BQHD, k_BSKD, scale):
  """Grouped-query scores [B, H, Q, S] in float32."""
  b, q_len, h, d = q_BQHD.shape
  kv = k_BSKD.shape[2]
  q = q_BQHD.reshape(b, q_len, kv, h // kv, d).astype(jnp.float32)
  s = jnp.einsum("bqkgd,bskd->bkgqs", q, k_BSKD.astype(jnp.float32)) * scale
  return s.reshape(b, h, q_len, k_BSKD.shape[1])


def _weighted_values(w_BHQS, v_BSKD):
  """sum_s w[b, h, q, s] v[b, s, kv(h), :] -> [B, Q, H, D] float32."""
  b, h, q_len, s_len = w_BHQS.shape
  kv = v_BSKD.shape[2]
  w = w_BHQS.reshape(b, kv, h // kv, q_len, s_len)
  out = jnp.einsum("bkgqs,bskd->bqkgd", w, v_BSKD.astype(jnp.float32))
  return out.reshape(b, q_len, h, v_BSKD.shape[-1])


def _masked_softmax(s, mask, axis=-1):
  """softmax of s over `axis` restricted to mask; all-masked slices give zeros."""
  s = jnp.where(mask, s, _NEG)
  e = jnp.where(mask, jnp.exp(s - jnp.max(s, axis=axis, keepdims=True)), 0.0)
  den = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)


def _top_k_blocks(landmark_s, landmark_ok, top_k):
  """bool mask [..., n_blocks]: the top_k visible landmarks by score (all when top_k covers
  them). Ties at the k-th score keep every tied block."""
  n = landmark_s.shape[-1]
  if top_k is None or top_k >= n:
    return landmark_ok
  s = jnp.where(landmark_ok, landmark_s, _NEG)
  kth = jax.lax.top_k(s, top_k)[0][..., -1:]
  return landmark_ok & (s >= kth)


def landmark_reference(q_BTHD, k_BTKD, v_BTKD, *, segment_ids, mem_freq: int,
                       top_k: int | None = None, scale=None):
  """The grouped softmax of the module doc as dense [T, T] weights (self-attention: queries
  and keys are the same T slots). Returns [B, T, H, D] in q's dtype."""
  b, t, h, d = q_BTHD.shape
  scale = d ** -0.5 if scale is None else scale
  s = _scores(q_BTHD, k_BTKD, scale)                                  # [B, H, T, T]
  blk, mem = slot_kinds(t, mem_freq)
  pair = lambda x: jnp.asarray(x)[None, None]                         # [T, T] -> [1, 1, T, T]
  visible = pair(np.tril(np.ones((t, t), bool))) & (
      segment_ids[:, None, :, None] == segment_ids[:, None, None, :])  # [B, 1, T, T]
  mem_key = pair(np.broadcast_to(mem, (t, t)))
  same, past = pair(blk[:, None] == blk[None, :]), pair(blk[:, None] > blk[None, :])
  current = visible & same & ~mem_key
  landmark = visible & past & mem_key
  ordinary = visible & past & ~mem_key
  n_blocks = -(-t // (mem_freq + 1))
  one_hot = np.arange(n_blocks)[None, :] == blk[:, None]             # [T(key), n_blocks]
  if top_k is not None:  # keep only the top_k past landmarks per (head, query)
    in_blk = landmark[..., None] & one_hot[None, None, None]          # [B, H, T, T, n_blocks]
    landmark_s = jnp.max(jnp.where(in_blk, s[..., None], _NEG), axis=-2)
    kept = _top_k_blocks(landmark_s, jnp.any(in_blk, axis=-2), top_k)  # [B, H, T, n_blocks]
    kept_key = jnp.any(kept[..., None, :] & one_hot[None, None, None], axis=-1)  # [B, H, T, T]
    landmark, ordinary = landmark & kept_key, ordinary & kept_key
  p = _masked_softmax(s, current | landmark)                          # the one big softmax
  # In-block softmax of the ordinary tokens: one masked softmax per past block, summed.
  in_block = jnp.zeros_like(s)
  gate = jnp.zeros_like(s)
  for i in range(n_blocks):
    in_i = jnp.asarray(one_hot[:, i])[None, None, None]                # [1, 1, 1, T]
    in_block += _masked_softmax(s, ordinary & in_i) * in_i
    gate += jnp.sum(jnp.where(landmark & in_i, p, 0.0), axis=-1, keepdims=True) * in_i
  w = jnp.where(current, p, 0.0) + jnp.where(ordinary, in_block * gate, 0.0)
  return _weighted_values(w, v_BTKD).astype(q_BTHD.dtype)


def _pad_rows(x, length, value=0):
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


def _block_queries(c, slot_Q, q_BQHD, seg_BQ, k_BSKD, v_BSKD, k_seg_BS, *, mem_freq: int,
                   top_k, scale):
  """The grouped softmax (top_k: the retrieval) of Q queries of block c, at in-block slots
  slot_Q [Q], against S = n whole blocks of keys -> [B, Q, H, D] float32. Scores are
  [B, H, Q, n, block]: each past block is one item (score: its landmark's; value: its in-block
  softmax mix of values), the current block's ordinary tokens are items of their own. The one
  formula of `landmark_blockwise` (a query block per step) and `landmark_decode` (one query)."""
  b, q_len, h, _ = q_BQHD.shape
  kv = k_BSKD.shape[2]
  p_len = mem_freq + 1
  n = k_BSKD.shape[1] // p_len
  slot = jnp.arange(p_len)
  is_mem = (slot == mem_freq)[None, None, None, None]                     # [1, 1, 1, 1, P]
  causal_in_block = ((slot_Q[:, None] >= slot[None, :]) & (slot != mem_freq)[None, :])[None, None]
  s = _scores(q_BQHD, k_BSKD, scale).reshape(b, h, q_len, n, p_len)     # [B, H, Q, n, P]
  ok = seg_BQ[:, None, :, None, None] == k_seg_BS.reshape(b, 1, 1, n, p_len)  # same segment
  past = (jnp.arange(n) < c)[None, None, None, :, None]                  # [1, 1, 1, n, 1]
  ordinary = ok & past & ~is_mem
  landmark_ok = (ok & past)[..., mem_freq]                               # [B, 1, Q, n]
  landmark_s = s[..., mem_freq]
  kept = _top_k_blocks(landmark_s, jnp.broadcast_to(landmark_ok, landmark_s.shape), top_k)
  # Each past block as one item: score = its landmark's, value = its in-block softmax mix.
  g = _masked_softmax(s, ordinary)                                       # [B, H, Q, n, P]
  v_blocks = v_BSKD.reshape(b, n, p_len, kv, -1)
  o_blk = jnp.einsum("bkgqnp,bnpkd->bkgqnd", g.reshape(b, kv, h // kv, q_len, n, p_len),
                     v_blocks.astype(jnp.float32)).reshape(b, h, q_len, n, -1)
  # The current block's ordinary tokens, read directly.
  s_cur = jax.lax.dynamic_index_in_dim(s, c, axis=3, keepdims=False)    # [B, H, Q, P]
  ok_cur = jax.lax.dynamic_index_in_dim(ok, c, axis=3, keepdims=False) & causal_in_block
  items_s = jnp.concatenate([jnp.where(kept, landmark_s, _NEG),
                             jnp.where(ok_cur, s_cur, _NEG)], axis=-1)
  m = jnp.max(items_s, axis=-1, keepdims=True)
  w = jnp.where(jnp.concatenate([kept, jnp.broadcast_to(ok_cur, s_cur.shape)], -1),
                jnp.exp(items_s - m), 0.0)
  den = jnp.sum(w, axis=-1, keepdims=True)
  w = w / jnp.where(den > 0, den, 1.0)
  w_blk, w_cur = w[..., :n], w[..., n:]
  v_cur = jax.lax.dynamic_slice_in_dim(v_BSKD, c * p_len, p_len, axis=1)
  return jnp.einsum("bhqn,bhqnd->bqhd", w_blk, o_blk) + _weighted_values(w_cur, v_cur)


def landmark_blockwise(q_BTHD, k_BTKD, v_BTKD, *, segment_ids, mem_freq: int,
                       top_k: int | None = None, scale=None):
  """The same grouped softmax (top_k: the retrieval of the module doc), one query block at a
  time: each step sees [B, H, block, n_blocks, block] scores, so activation memory is linear in
  T; the step is rematerialised in the backward pass (jax.checkpoint)."""
  b, t, h, d = q_BTHD.shape
  scale = d ** -0.5 if scale is None else scale
  p_len = mem_freq + 1
  n = -(-t // p_len)
  tp = n * p_len
  seg = _pad_rows(segment_ids, tp, -1)                   # padding keys match no query
  k, v = _pad_rows(k_BTKD, tp), _pad_rows(v_BTKD, tp)
  q_NBPHD = jnp.moveaxis(_pad_rows(q_BTHD, tp).reshape(b, n, p_len, h, d), 1, 0)
  seg_NBP = jnp.moveaxis(seg.reshape(b, n, p_len), 1, 0)

  @jax.checkpoint
  def step(c, q_BPHD, seg_BP):
    return _block_queries(c, jnp.arange(p_len), q_BPHD, seg_BP, k, v, seg, mem_freq=mem_freq,
                          top_k=top_k, scale=scale)

  def body(carry, xs):
    c, q_c, seg_c = xs
    return carry, step(c, q_c, seg_c)

  _, out_NBPHD = jax.lax.scan(body, None, (jnp.arange(n), q_NBPHD, seg_NBP))
  out = jnp.moveaxis(out_NBPHD, 0, 1).reshape(b, tp, h, d)[:, :t]
  return out.astype(q_BTHD.dtype)


def landmark_decode(q_B1HD, k_BSKD, v_BSKD, *, slot, segment_ids, k_segment_ids,
                    mem_freq: int, top_k: int | None = None, scale=None):
  """One query per row against a key/value cache of S slots laid out as a row (whole blocks,
  landmarks in their slots): the query of slot `slot` [B] (int, per row) with segment id
  `segment_ids` [B, 1]; `k_segment_ids` [B, S] (0 for an empty slot: it matches no query). Its
  own key and value must already be in the cache; slots after it are never read (causal). The
  output equals that query's row of `landmark_blockwise` over the same slots (Mohtashami &
  Jaggi 2023, Section 3.2: the top_k past blocks by landmark score, then the grouped softmax):
  the same `_block_queries`, with one query. Returns [B, 1, H, D] in q's dtype."""
  d = q_B1HD.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  p_len = mem_freq + 1
  if k_BSKD.shape[1] % p_len:
    raise ValueError(f"a landmark cache holds whole blocks of mem_freq + 1 = {p_len} slots, got "
                     f"{k_BSKD.shape[1]} slots")

  def row(q_1HD, k_SKD, v_SKD, slot_, seg_1, k_seg_S):  # a row's own block index: vmap
    return _block_queries(slot_ // p_len, (slot_ % p_len)[None], q_1HD[None], seg_1[None],
                          k_SKD[None], v_SKD[None], k_seg_S[None], mem_freq=mem_freq,
                          top_k=top_k, scale=scale)[0]

  out = jax.vmap(row)(q_B1HD, k_BSKD, v_BSKD, slot, segment_ids, k_segment_ids)
  return out.astype(q_B1HD.dtype)


IMPLEMENTATIONS: Registry = Registry("model.attention_impl")
IMPLEMENTATIONS.add("reference", landmark_reference)
IMPLEMENTATIONS.add("blockwise", landmark_blockwise)
