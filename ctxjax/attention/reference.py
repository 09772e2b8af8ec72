"""Dense reference attention: materialises the [T, S] score matrix. The oracle for every test.

Scores and softmax in float32 (whatever the input dtype); grouped-query attention by reshaping
queries to [batch, length, kv_heads, group, head_dim] (query head h reads kv head h // group,
as Hugging Face's `repeat_kv`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ctxjax.attention.api import register_implementation

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: keeps gradients NaN-free


def visibility_and_alibi(pattern, q_pos, k_pos, q_seg, k_seg, slopes=None):
  """The visibility rule and ALiBi bias that every kernel applies, on any score layout.

  Arguments are already shaped to broadcast against the kernel's score array (each kernel has
  its own layout: [B,K,G,T,S] here, [B,H,T,S] in fused, [B,K,S,G,T] in blockwise's backward).
  -> (mask: pattern.mask(q_pos, k_pos) & same segment, bias: -slopes * (q_pos - k_pos) float32
  from GLOBAL positions (ALiBi, Press et al. 2022), or None without slopes).
  """
  mask = pattern.mask(q_pos, k_pos) & (q_seg == k_seg)
  if slopes is None:
    return mask, None
  return mask, -jnp.asarray(slopes, jnp.float32) * (q_pos - k_pos).astype(jnp.float32)


def attention_logits(q_BTKGD, k_BSKD, *, scale, q_positions_BT, k_positions_BS, q_segment_ids_BT,
                     k_segment_ids_BS, pattern, alibi_slopes_H=None):
  """Masked float32 logits [B, K, G, T, S] and the boolean mask (shared with tests/kernels)."""
  logits = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD,
                      preferred_element_type=jnp.float32) * scale
  _, _, num_kv, group, _ = q_BTKGD.shape
  slopes = None
  if alibi_slopes_H is not None:
    slopes = jnp.asarray(alibi_slopes_H, jnp.float32).reshape(1, num_kv, group, 1, 1)
  mask, bias = visibility_and_alibi(
      pattern, q_positions_BT[:, None, None, :, None], k_positions_BS[:, None, None, None, :],
      q_segment_ids_BT[:, None, None, :, None], k_segment_ids_BS[:, None, None, None, :], slopes)
  if bias is not None:
    logits = logits + bias
  return jnp.where(mask, logits, MASKED), mask


@register_implementation("reference")
def reference_attention(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids,
                        k_segment_ids, pattern, alibi_slopes=None, scale=None):
  batch, q_len, num_heads, head_dim = q_BTHD.shape
  num_kv = k_BSKD.shape[2]
  scale = head_dim ** -0.5 if scale is None else scale
  q_BTKGD = q_BTHD.reshape(batch, q_len, num_kv, num_heads // num_kv, head_dim)
  logits, mask = attention_logits(
      q_BTKGD, k_BSKD, scale=scale, q_positions_BT=q_positions, k_positions_BS=k_positions,
      q_segment_ids_BT=q_segment_ids, k_segment_ids_BS=k_segment_ids, pattern=pattern,
      alibi_slopes_H=alibi_slopes)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)  # fully masked row -> 0
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BSKD.dtype), v_BSKD,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q_BTHD.dtype)
