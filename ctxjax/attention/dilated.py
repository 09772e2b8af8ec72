"""LongNet dilated attention (Ding et al. 2023; TECHNIQUES.md section 8), and partial attention
(out, lse) with exact gradients, the building block it shares with LM-Infinite.

Partial attention
  `attend_with_lse` returns (out, lse) of one key set and is differentiable in q, k, v through
  BOTH outputs: "reference" differentiates the dense math; "blockwise" is a `jax.custom_vjp`
  over `blockwise_forward` / `blockwise_backward` whose backward folds the lse cotangent into
  delta (dS = P * (dP - (rowsum(dO * O) - dlse)), since d lse / d s = P). `merge_partials`
  mixes partials by softmax over their lse (weights = softmax denominators): over disjoint key
  sets this IS attention over their union, values and gradients.

Dilated attention (torchscale `component/dilated_attention.py`, semantics kept)
  * Branch (w, r): token index t (in the row) lies in segment t // w' (w' = min(w, T)); the
    heads form r contiguous groups of ceil(H / r) heads (head h in group h // ceil(H / r); the
    last groups may be short or empty, as torchscale's head padding), and group g keeps the
    tokens whose in-segment offset t mod w' is congruent to g mod r. Each (segment, group) is
    a sparse sequence of ceil(w' / r) slots with causal attention inside (by position ids).
  * Packing: a slot sees only keys of its own segment AND its own document (segment ids).
  * Mixing: a head/query outside a branch's group gets lse = -inf there (weight 0); branches
    are merged by `merge_partials`. Shared keys count once per branch (TECHNIQUES note).
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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ctxjax.attention import blockwise as bw
from ctxjax.attention.patterns import Causal
from ctxjax.attention.reference import attention_logits

merge_partials = bw.merge_partials  # re-exported: lm_infinite and tests import it here
_F32 = jnp.float32
IMPLS = ("reference", "blockwise")


# ----------------------------------------------------------------------------------------------
# Partial attention with lse, and mixing
# ----------------------------------------------------------------------------------------------

def _reference_with_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale):
  b, t, h, d = q.shape
  num_kv = k.shape[2]
  logits, mask = attention_logits(
      q.reshape(b, t, num_kv, h // num_kv, d), k, scale=scale, q_positions_BT=q_pos,
      k_positions_BS=k_pos, q_segment_ids_BT=q_seg, k_segment_ids_BS=k_seg, pattern=pattern,
      alibi_slopes_H=slopes)                                         # [B, K, G, T, S]
  lse = jax.nn.logsumexp(logits, axis=-1)                            # finite (masked finite)
  probs = jnp.where(mask, jnp.exp(logits - lse[..., None]), 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(_F32), preferred_element_type=_F32)
  lse = jnp.where(mask.any(axis=-1), lse, -jnp.inf)
  return out.reshape(b, t, h, d), lse.transpose(0, 3, 1, 2).reshape(b, t, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _blockwise_with_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale):
  return bw.blockwise_forward(q, k, v, q_positions=q_pos, k_positions=k_pos,
                              q_segment_ids=q_seg, k_segment_ids=k_seg, pattern=pattern,
                              alibi_slopes=slopes, scale=scale)


def _blockwise_with_lse_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale):
  out, lse = _blockwise_with_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale)
  return (out, lse), (q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, slopes)


def _blockwise_with_lse_bwd(pattern, scale, res, cotangents):
  q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, slopes = res
  d_out, d_lse = cotangents
  delta = jnp.sum(d_out.astype(_F32) * out, axis=-1) - d_lse.astype(_F32)
  dq, dk, dv = bw.blockwise_backward(
      q, k, v, out, lse, d_out, q_positions=q_pos, k_positions=k_pos, q_segment_ids=q_seg,
      k_segment_ids=k_seg, pattern=pattern, alibi_slopes=slopes, scale=scale, delta_BTH=delta)
  d_slopes = None if slopes is None else jnp.zeros_like(slopes)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None,
          d_slopes)


_blockwise_with_lse.defvjp(_blockwise_with_lse_fwd, _blockwise_with_lse_bwd)


def attend_with_lse(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids,
                    k_segment_ids, pattern, alibi_slopes=None, impl="reference", scale=None):
  """Partial attention -> (out float32 [B,T,H,D], lse float32 [B,T,H]), same contract as
  `attend` (GQA, segments, ALiBi from positions); rows with no visible key: out 0, lse -inf.

  Differentiable (exactly) in q, k, v through out AND lse. impl: "reference" | "blockwise".
  """
  if impl not in IMPLS:
    raise ValueError(f"attend_with_lse impl={impl!r}; valid choices: {list(IMPLS)}")
  scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, _F32)
  fn = _reference_with_lse if impl == "reference" else _blockwise_with_lse
  return fn(q_BTHD, k_BSKD, v_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids,
            slopes, pattern, scale)


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
  "blockwise". Exact gradients (see module docstring).
  """
  if impl not in IMPLS:
    raise ValueError(f"dilated_attention impl={impl!r}; valid choices: {list(IMPLS)}")
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
