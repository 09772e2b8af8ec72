"""Vendor kernels behind the same entry point, and `auto`, which picks the fastest one that can
express the request on the current backend.

  xla     jax.nn.dot_product_attention(implementation="xla") with an explicit mask/bias built
          from positions, segment ids and the pattern. Any backend, any pattern (dense T x S).
  cudnn   jax.nn.dot_product_attention(implementation="cudnn") — GPU, fp16/bf16, causal or
          full patterns (cuDNN's causal mask is by token index, which equals the positional rule
          when positions increase within each segment, as packing, PoSE and randomized ids do),
          segment ids and ALiBi as mask/bias.
  splash  Pallas splash attention (jax.experimental.pallas.ops.tpu) — TPU, causal/full/sliding
          window by index with segment ids; no ALiBi. `CTXJAX_SPLASH_INTERPRET=1` runs the Pallas
          interpreter on CPU (tests).
  auto    TPU: splash if it can express the call; GPU: cudnn likewise; else blockwise.
A forced kernel that cannot express the request raises a ValueError naming what is missing.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from ctxjax.attention import blockwise
from ctxjax.attention.api import register_implementation
from ctxjax.attention.reference import visibility_and_alibi

_SPLASH_BLOCK = 128


def _mask_and_bias(q_positions, k_positions, q_segment_ids, k_segment_ids, pattern, alibi_slopes,
                   num_heads):
  """Dense [B, 1, T, S] visibility mask and [B, H, T, S] ALiBi bias (or None): the reference's
  rule (`visibility_and_alibi`) on jax.nn.dot_product_attention's [B, H, T, S] layout."""
  slopes = None
  if alibi_slopes is not None:
    slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(1, num_heads, 1, 1)
  return visibility_and_alibi(pattern, q_positions[:, None, :, None], k_positions[:, None, None, :],
                              q_segment_ids[:, None, :, None], k_segment_ids[:, None, None, :],
                              slopes)


def _dpa(implementation, q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids,
         pattern, alibi_slopes, scale):
  mask, bias = _mask_and_bias(q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                              alibi_slopes, q.shape[2])
  if bias is not None:
    bias = bias.astype(q.dtype)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                     implementation=implementation)
  # A row that sees no key: jax returns mean(V); the ctxjax contract is 0.
  seen = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # [B, T, 1, 1]
  return jnp.where(seen, out, 0).astype(q.dtype)


@register_implementation("xla")
def xla_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                  alibi_slopes=None, scale=None):
  return _dpa("xla", q, k, v, q_positions=q_positions, k_positions=k_positions,
              q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, pattern=pattern,
              alibi_slopes=alibi_slopes, scale=scale)


def cudnn_unsupported(q, pattern, alibi_slopes) -> str | None:
  """Why cuDNN cannot run this call, or None if it can."""
  if jax.default_backend() != "gpu":
    return f"cudnn attention needs a GPU backend (this is {jax.default_backend()!r})"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cudnn attention needs bfloat16/float16 inputs, got {q.dtype}"
  if pattern.kind not in ("causal", "full"):
    return f"cudnn attention supports patterns causal/full, not {pattern.kind!r}"
  if q.shape[-1] > 128 or q.shape[-1] % 8:
    return f"cudnn attention needs head_dim <= 128 and a multiple of 8, got {q.shape[-1]}"
  return None


@register_implementation("cudnn")
def cudnn_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                    alibi_slopes=None, scale=None):
  reason = cudnn_unsupported(q, pattern, alibi_slopes)
  if reason:
    raise ValueError(reason + "; use impl='auto' to fall back to blockwise")
  return _dpa("cudnn", q, k, v, q_positions=q_positions, k_positions=k_positions,
              q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, pattern=pattern,
              alibi_slopes=alibi_slopes, scale=scale)


def _splash_interpret() -> bool:
  return os.environ.get("CTXJAX_SPLASH_INTERPRET", "") == "1"


def splash_unsupported(q, k, pattern, alibi_slopes) -> str | None:
  """Why splash attention cannot run this call, or None if it can."""
  if jax.default_backend() != "tpu" and not _splash_interpret():
    return f"splash attention needs a TPU backend (this is {jax.default_backend()!r})"
  if alibi_slopes is not None:
    return "splash attention has no ALiBi bias"
  if pattern.kind not in ("causal", "full", "sliding_window"):
    return f"splash attention supports patterns causal/full/sliding_window, not {pattern.kind!r}"
  if q.shape[1] % _SPLASH_BLOCK or k.shape[1] % _SPLASH_BLOCK:
    return (f"splash attention needs lengths divisible by {_SPLASH_BLOCK}, got "
            f"{q.shape[1]} and {k.shape[1]}")
  return None


@functools.lru_cache(maxsize=32)
def _splash_kernel(kind: str, window: int | None, group: int, q_len: int, kv_len: int,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (q_len, kv_len)
  if kind == "causal":
    mask = sm.CausalMask(shape)
  elif kind == "sliding_window":
    mask = sm.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  else:
    mask = sm.FullMask(shape)
  block = sk.BlockSizes(
      block_q=_SPLASH_BLOCK, block_kv=_SPLASH_BLOCK, block_kv_compute=_SPLASH_BLOCK,
      block_q_dkv=_SPLASH_BLOCK, block_kv_dkv=_SPLASH_BLOCK,
      block_kv_dkv_compute=_SPLASH_BLOCK, block_q_dq=_SPLASH_BLOCK, block_kv_dq=_SPLASH_BLOCK)
  # One kv head serves `group` query heads: the MQA form of splash, vmapped over kv heads.
  return sk.make_splash_mqa(sm.MultiHeadMask([mask] * group), block_sizes=block, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


@register_implementation("splash")
def splash_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                     alibi_slopes=None, scale=None):
  reason = splash_unsupported(q, k, pattern, alibi_slopes)
  if reason:
    raise ValueError(reason + "; use impl='auto' to fall back to blockwise")
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  batch, q_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  group = num_heads // num_kv
  scale = head_dim ** -0.5 if scale is None else scale
  kernel = _splash_kernel(pattern.kind, getattr(pattern, "window", None), group, q_len,
                          k.shape[1], _splash_interpret())
  q_BKGTD = (q * scale).reshape(batch, q_len, num_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
  k_BKSD, v_BKSD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def one(q_GTD, k_SD, v_SD, q_seg, k_seg):
    return kernel(q_GTD, k_SD, v_SD, segment_ids=sk.SegmentIds(q=q_seg, kv=k_seg))

  per_kv = jax.vmap(one, in_axes=(0, 0, 0, None, None))           # over kv heads
  out = jax.vmap(per_kv)(q_BKGTD, k_BKSD, v_BKSD, q_segment_ids, k_segment_ids)  # over batch
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


@register_implementation("auto")
def auto_attention(q, k, v, **kwargs):
  """The fastest kernel that can express the call on this backend; blockwise otherwise."""
  backend = jax.default_backend()
  if backend == "tpu" and not splash_unsupported(q, k, kwargs["pattern"], kwargs["alibi_slopes"]):
    return splash_attention(q, k, v, **kwargs)
  if backend == "gpu" and not cudnn_unsupported(q, kwargs["pattern"], kwargs["alibi_slopes"]):
    return cudnn_attention(q, k, v, **kwargs)
  return blockwise.blockwise_attention(q, k, v, **kwargs)
