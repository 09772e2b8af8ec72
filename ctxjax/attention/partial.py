"""Partial attention (out, lse) over one key set, differentiable through BOTH outputs.

`attend_with_lse` is the building block of attention made of several key sets — LongNet's
dilated branches (dilated.py), LM-Infinite's local and global branches (lm_infinite.py): each
set returns (out, lse) and `merge_partials` mixes them by softmax over their lse (weights =
softmax denominators), which over disjoint key sets IS attention over their union, values and
gradients. "reference" differentiates the dense math; "blockwise" is a `jax.custom_vjp` over
`blockwise_forward` / `blockwise_backward` whose backward folds the lse cotangent into delta:
dS = P * (dP - (rowsum(dO * O) - dlse)), since d lse / d s = P.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ctxjax.attention import blockwise
from ctxjax.attention.online_softmax import merge_partials  # noqa: F401  (re-exported)
from ctxjax.attention.reference import attention_logits
from ctxjax.registry import Registry

_F32 = jnp.float32

# The kernels with a differentiable (out, lse): what `model.attention_impl` may name in the
# attention modes built on partial attention (dilated, lm_infinite).
IMPLS = Registry("model.attention_impl")


@IMPLS.register("reference")
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
  return blockwise.blockwise_forward(q, k, v, q_positions=q_pos, k_positions=k_pos,
                                     q_segment_ids=q_seg, k_segment_ids=k_seg, pattern=pattern,
                                     alibi_slopes=slopes, scale=scale)


def _blockwise_with_lse_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale):
  out, lse = _blockwise_with_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale)
  return (out, lse), (q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, slopes)


def _blockwise_with_lse_bwd(pattern, scale, res, cotangents):
  q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, slopes = res
  d_out, d_lse = cotangents
  delta = jnp.sum(d_out.astype(_F32) * out, axis=-1) - d_lse.astype(_F32)
  dq, dk, dv = blockwise.blockwise_backward(
      q, k, v, out, lse, d_out, q_positions=q_pos, k_positions=k_pos, q_segment_ids=q_seg,
      k_segment_ids=k_seg, pattern=pattern, alibi_slopes=slopes, scale=scale, delta_BTH=delta)
  d_slopes = None if slopes is None else jnp.zeros_like(slopes)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None,
          d_slopes)


_blockwise_with_lse.defvjp(_blockwise_with_lse_fwd, _blockwise_with_lse_bwd)
IMPLS.add("blockwise", _blockwise_with_lse)
# `auto` (the model's default kernel) picks blockwise on every backend here: cuDNN and splash
# return no lse to merge with.
IMPLS.add("auto", _blockwise_with_lse)


def attend_with_lse(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids,
                    k_segment_ids, pattern, alibi_slopes=None, impl="reference", scale=None):
  """Partial attention -> (out float32 [B,T,H,D], lse float32 [B,T,H]), same contract as
  `attend` (GQA, segments, ALiBi from positions); rows with no visible key: out 0, lse -inf.

  Differentiable (exactly) in q, k, v through out AND lse. impl: "reference" | "blockwise" |
  "auto" (= blockwise).
  """
  kernel = IMPLS.get(impl)
  scale = q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale)
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, _F32)
  return kernel(q_BTHD, k_BSKD, v_BSKD, q_positions, k_positions, q_segment_ids, k_segment_ids,
                slopes, pattern, scale)
