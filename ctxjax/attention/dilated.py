"""LongNet dilated attention (Ding et al. 2023, Section 2.2).

Each branch is one partial attention (out, lse) with exact gradients (`partial.attend_with_lse`,
shared with LM-Infinite); branches are mixed by `merge_partials` (softmax over their lse).

Dilated attention (torchscale `component/dilated_attention.py`, semantics kept)
  * Branch (w, r): token index t (in the row) lies in segment t // w' (w' = min(w, T)); the
    heads form r contiguous groups of ceil(H / r) heads (head h in group h // ceil(H / r); the
    last groups may be short or empty, as torchscale's head padding), and group g keeps the
    tokens whose in-segment offset t mod w' is congruent to g mod r. Each (segment, group) is
    a sparse sequence of ceil(w' / r) slots with causal attention inside (by position ids).
  * Packing: a slot sees only keys of its own segment AND its own document (segment ids).
  * Mixing: a head/query outside a branch's group gets lse = -inf there (weight 0); branches
    are merged by `merge_partials`. Shared keys count once per branch.
  * Gradients: EXACT, not torchscale's stop-grad (`torch.no_grad` on the weights): the mixing
    weights are differentiated too, so the gradient is that of the forward function.

Layout: the r groups of a branch are gathered into sparse sequences (static index tables, see
`_sparse_layout`) and stacked along the batch axis, so a branch is ONE kernel call over
[r * B, T_sparse, ceil(H / r), D]; with block skipping a head costs O(T * w / r^2) scores.
Slots past the end of a short segment (w' not a multiple of r, or T not a multiple of w') are
filler: they copy a neighbour's token but get an even segment id (real slots odd), so no real
query sees them and block segment ranges stay tight; their outputs are dropped. T is the whole
row: sequence-sharded (ring) use would need torchscale's KV all-gather (not implemented).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from ctxjax.attention.partial import IMPLS, attend_with_lse, merge_partials  # noqa: F401
from ctxjax.attention.patterns import Causal


# ----------------------------------------------------------------------------------------------
# Dilated attention
# ----------------------------------------------------------------------------------------------

def head_group_size(num_heads: int, dilation_rate: int) -> int:
  """Heads per group: ceil(H / r); head h is in group h // head_group_size (torchscale)."""
  return -(-num_heads // dilation_rate)


@functools.lru_cache(maxsize=None)
def _sparse_layout(length: int, segment_length: int, dilation_rate: int):
  """Static numpy tables of one branch (see module docstring).

  src [r, S]: token read by each sparse slot (filler slots: a real neighbour's token);
  real [r, S]: slot holds its own token; seg [r, S]: segment index of src; inv [r, T]: slot of
  token t in group g, or -1 (t not covered by group g). S = n_segments * ceil(w' / r).
  """
  w, r = min(segment_length, length), dilation_rate
  n_seg, per_seg = -(-length // w), -(-w // r)
  g, s, i = np.ogrid[:r, :n_seg, :per_seg]
  offset = g + r * i
  token = np.broadcast_to(s * w + offset, (r, n_seg, per_seg)).reshape(r, -1)
  real = np.broadcast_to((offset < w) & (s * w + offset < length),
                         (r, n_seg, per_seg)).reshape(r, -1)
  slots = np.arange(token.shape[1])
  src = np.zeros_like(token)
  inv = np.full((r, length), -1, np.int64)
  for grp in range(r):
    idx = np.flatnonzero(real[grp])
    if idx.size == 0:  # group covers nothing (r > w'): all filler, all dropped
      continue
    inv[grp, token[grp, idx]] = idx
    nearest = idx[np.clip(np.searchsorted(idx, slots), 0, idx.size - 1)]
    src[grp] = token[grp, np.where(real[grp], slots, nearest)]
  return src, real, src // w, inv, n_seg


def dilated_coverage(length: int, segment_length: int, dilation_rate: int,
                     num_heads: int) -> np.ndarray:
  """Bool [H, T]: which token indices head h attends from/to in this branch."""
  _, _, _, inv, _ = _sparse_layout(length, segment_length, dilation_rate)
  group = np.arange(num_heads) // head_group_size(num_heads, dilation_rate)
  return inv[group] >= 0


def _grouped_heads(x_BTHD, num_groups, per_group):
  """Pad heads to num_groups * per_group (zeros) -> [B, T, num_groups, per_group, D]."""
  b, t, h, d = x_BTHD.shape
  pad = num_groups * per_group - h
  x = jnp.pad(x_BTHD, [(0, 0), (0, 0), (0, pad), (0, 0)]) if pad else x_BTHD
  return x.reshape(b, t, num_groups, per_group, d)


def _branch(q, k, v, positions, segment_ids, segment_length, dilation_rate, impl, scale):
  batch, length, num_heads, head_dim = q.shape
  num_kv, r = k.shape[2], dilation_rate
  src, real, seg, inv, n_seg = _sparse_layout(length, segment_length, r)
  hg = head_group_size(num_heads, r)
  if num_heads % r == 0 and num_kv % r == 0:  # GQA survives the split
    k, v = _grouped_heads(k, r, num_kv // r), _grouped_heads(v, r, num_kv // r)
  else:  # expand kv to one kv head per query head, then group like q
    rep = num_heads // num_kv
    k = _grouped_heads(jnp.repeat(k, rep, axis=2), r, hg)
    v = _grouped_heads(jnp.repeat(v, rep, axis=2), r, hg)
  group_RS = np.broadcast_to(np.arange(r)[:, None], src.shape)

  def sparse(x_BTRhD):  # group g's heads at group g's slots -> [r * B, S, h, D] (group-major)
    x = x_BTRhD[:, src, group_RS]                       # [B, r, S, h, D]
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])

  def sparse_ids(x_BT):
    return jnp.swapaxes(x_BT[:, src], 0, 1).reshape(r * batch, -1)

  ids = sparse_ids(segment_ids)                     # [r * B, S] document ids
  ids = 2 * (ids * n_seg + np.repeat(seg, batch, 0)) + np.repeat(real, batch, 0).astype(np.int32)
  pos = sparse_ids(positions)
  out, lse = attend_with_lse(
      sparse(_grouped_heads(q, r, hg)), sparse(k), sparse(v), q_positions=pos, k_positions=pos,
      q_segment_ids=ids, k_segment_ids=ids, pattern=Causal(), impl=impl, scale=scale)
  # Back to dense token order; token t of group g sits at slot inv[g, t] (uncovered: -1).
  slot_TR, covered_TR = np.maximum(inv, 0).T, (inv >= 0).T
  group_TR = np.broadcast_to(np.arange(r)[None, :], slot_TR.shape)
  out = out.reshape(r, batch, -1, hg, head_dim).swapaxes(0, 1)[:, group_TR, slot_TR]
  lse = lse.reshape(r, batch, -1, hg).swapaxes(0, 1)[:, group_TR, slot_TR]  # [B, T, r, hg]
  out = jnp.where(covered_TR[None, :, :, None, None], out, 0.0)
  lse = jnp.where(covered_TR[None, :, :, None], lse, -jnp.inf)
  out = out.reshape(batch, length, r * hg, head_dim)[:, :, :num_heads]
  return out, lse.reshape(batch, length, r * hg)[:, :, :num_heads]


def dilated_attention(q_BTHD, k_BTKD, v_BTKD, *, positions, segment_ids, segment_lengths,
                      dilation_rates, impl="reference", scale=None):
  """LongNet dilated self-attention (causal) -> [B, T, H, D] in q's dtype.

  q: [B, T, H, D]; k, v: [B, T, K, D] (already rotated: xPos/RoPE from global positions);
  positions, segment_ids: int [B, T] (segment ids >= 0); segment_lengths, dilation_rates:
  equal-length sequences of positive ints, one (w_k, r_k) per branch. impl: "reference" |
  "blockwise" | "auto" (= blockwise). Exact gradients (see module docstring).
  """
  IMPLS.check(impl)
  segment_lengths, dilation_rates = tuple(segment_lengths), tuple(dilation_rates)
  if not segment_lengths or len(segment_lengths) != len(dilation_rates):
    raise ValueError(f"dilated_attention needs one dilation rate per segment length, got "
                     f"segment_lengths={segment_lengths}, dilation_rates={dilation_rates}")
  for name, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0
               for x in values):
      raise ValueError(f"dilated_attention {name} must be positive integers, got {values}")
  batch, length, num_heads, _ = q_BTHD.shape
  if k_BTKD.shape[1] != length or v_BTKD.shape != k_BTKD.shape or num_heads % k_BTKD.shape[2]:
    raise ValueError(f"dilated_attention is self-attention with GQA: q {q_BTHD.shape}, "
                     f"k {k_BTKD.shape}, v {v_BTKD.shape}")
  for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
    if arr.shape != (batch, length):
      raise ValueError(f"dilated_attention {name} has shape {arr.shape}, want {(batch, length)}")
  partials = [_branch(q_BTHD, k_BTKD, v_BTKD, positions, segment_ids, int(w), int(r), impl,
                      scale) for w, r in zip(segment_lengths, dilation_rates)]
  out, _ = merge_partials(partials)
  return out.astype(q_BTHD.dtype)
