"""Attention with a key/value cache (kv_cache.py), per attention mode.

What a cache stores depends on the mode:
  standard, s2  keys as the positional scheme rotated them when they were computed, as
                transformers' DynamicCache does. Sequence-length-dependent RoPE (dynamic NTK,
                LongRoPE: seq_len = max(position) + 1) therefore rotates each token with the
                frequencies of the call that computed it: the prompt's with the prompt's
                length, each new token's with its own position + 1, exactly as transformers'
                `generate` does (and unlike one forward pass over the whole sequence). xPos
                keys use a fixed decay centre 0 (it cancels in logits; the cache needs one).
                s2 (LongLoRA's S2-Attn) is full attention at inference, as the paper says.
  lm_infinite   unrotated keys: LM-Infinite (Han et al. 2024) sees a global key at position 0
                and a local key at its own position, so each step rotates the (bounded) cache
                for both branches.
  landmark      rotated keys of every slot, landmarks included, at their slot index (Mohtashami &
                Jaggi 2023, Section 3.2; landmark_mode.decode_step): decoded by
                ctxjax.model.landmark_generate, which feeds the landmark slots, never by
                ctxjax.eval.generate.
A prefill runs the mode's own kernel over the prompt (any `attention_impl`); a decode step
attends one query per row to the heads-major cache with `one_query_attention`: the reference
kernel's arithmetic (float32 scores, the same visibility rule and ALiBi bias) laid out so each
cached key and value is read once, in place.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ctxjax.attention import reference
from ctxjax.attention.lm_infinite import lm_infinite_attention
from ctxjax.model import attention_modes, kv_cache, landmark_mode
from ctxjax.registry import Registry

_DECODE_IMPL = "reference"

# attention_mode -> (stores rotated keys?, decode-step attention)
CACHED_MODES: Registry = Registry("model.attention_mode")


def _rotate(cfg, scheme, q, k, q_positions, k_positions):
  if scheme.rotate_qk is None:
    return q, k
  return scheme.rotate_qk(cfg, q, k, q_positions, k_positions, center=0)


def one_query_attention(q_B1HD, k_BKCD, v_BKCD, k_B1KD, v_B1KD, *, q_positions, k_positions,
                        q_segment_ids, k_segment_ids, pattern, alibi_slopes=None):
  """reference_attention of one query per row over a heads-major [B, K, C, D] cache plus the
  row's own new key/value [B, 1, K, D] (not yet in the cache): the same float32 scores, mask,
  ALiBi bias and softmax, as batched matmuls over (batch, kv head). Reading the cache before
  the step writes it lets XLA update it in place (written first, XLA:CPU copies it every step
  to feed both the matmul and the loop)."""
  batch, _, num_heads, head_dim = q_B1HD.shape
  num_kv = k_BKCD.shape[1]
  group = num_heads // num_kv
  q_BKGD = q_B1HD.reshape(batch, num_kv, group, head_dim)
  scores = lambda k, spec: jnp.einsum(spec, q_BKGD, k, preferred_element_type=jnp.float32)
  logits_BKGS = jnp.concatenate([scores(k_BKCD, "bkgd,bkcd->bkgc"),
                                 scores(k_B1KD, "bkgd,bckd->bkgc")], axis=-1) * head_dim ** -0.5
  slopes = (None if alibi_slopes is None else
            jnp.asarray(alibi_slopes, jnp.float32).reshape(1, num_kv, group, 1))
  mask, bias = reference.visibility_and_alibi(
      pattern, q_positions[:, :, None, None], k_positions[:, None, None, :],
      q_segment_ids[:, :, None, None], k_segment_ids[:, None, None, :], slopes)
  if bias is not None:
    logits_BKGS = logits_BKGS + bias
  probs = jax.nn.softmax(jnp.where(mask, logits_BKGS, reference.MASKED), axis=-1)
  probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)  # fully masked row -> 0
  probs = probs.astype(v_BKCD.dtype)
  capacity = k_BKCD.shape[2]
  out = (jnp.einsum("bkgc,bkcd->bkgd", probs[..., :capacity], v_BKCD,
                    preferred_element_type=jnp.float32)
         + jnp.einsum("bkgc,bckd->bkgd", probs[..., capacity:], v_B1KD,
                      preferred_element_type=jnp.float32))
  return out.reshape(batch, 1, num_heads, head_dim).astype(q_B1HD.dtype)


def _standard_step(cfg, scheme, q_rot, k_new, v_new, k_cache, v_cache, positions, segment_ids,
                   p):
  """Attend to the cache without the slot this token takes (a ring buffer's evicted key)
  and to the token itself, then store it."""
  evicted_BC = jnp.arange(p.positions.shape[1])[None, :] == p.slot[:, None]
  k_positions = jnp.concatenate([p.positions, positions], axis=1)
  k_segments = jnp.concatenate([jnp.where(evicted_BC, 0, p.valid),
                                jnp.minimum(segment_ids, 1)], axis=1)
  out = one_query_attention(q_rot, k_cache, v_cache, k_new, v_new, q_positions=positions,
                            k_positions=k_positions, q_segment_ids=segment_ids,
                            k_segment_ids=k_segments, pattern=cfg.attention_pattern,
                            alibi_slopes=scheme.alibi_slopes(cfg.num_attention_heads))
  # The write must follow the reads for XLA to update the cache in place; without a data
  # dependency its copy insertion cannot order them and copies the cache every step.
  after_reads = (out.reshape(-1)[0] * 0).astype(k_new.dtype)
  return (out, *kv_cache.write(k_cache, v_cache, k_new + after_reads, v_new + after_reads, p))


def _lm_infinite_step(cfg, scheme, q, k_new, v_new, k_cache, v_cache, positions, segment_ids,
                      p):
  """LM-Infinite rotates the whole (bounded) cache each step anyway: it writes the token
  first and reads the cache in the kernels' [B, C, K, D] layout."""
  opts = dict(cfg.attention_options)
  k_cache, v_cache = kv_cache.write(k_cache, v_cache, k_new, v_new, p)
  k_BCKD, v_BCKD = (x.transpose(0, 2, 1, 3) for x in (k_cache, v_cache))
  out = lm_infinite_attention(q, k_BCKD, v_BCKD, positions=positions,
                              segment_ids=segment_ids, k_positions=p.positions,
                              k_segment_ids=p.valid, n_global=opts["n_global"],
                              n_local=opts["n_local"],
                              rotate_qk=functools.partial(scheme.rotate_qk, cfg),
                              impl=_DECODE_IMPL)
  return out, k_cache, v_cache


CACHED_MODES.add("standard", (True, _standard_step))
CACHED_MODES.add("s2", (True, _standard_step))
CACHED_MODES.add("lm_infinite", (False, _lm_infinite_step))
CACHED_MODES.add("landmark", (True, landmark_mode.decode_step))

# Modes with a cache whose decoder is not ctxjax.eval.generate: it would feed content tokens only.
OWN_DECODER = {"landmark": "ctxjax.model.landmark_generate (it inserts the landmark slots)"}


def check_cacheable(cfg) -> None:
  """One line naming the mode when this model cannot decode with ctxjax.eval.generate."""
  if cfg.attention_mode in OWN_DECODER:
    raise ValueError(f"model.attention_mode={cfg.attention_mode!r} decodes with "
                     f"{OWN_DECODER[cfg.attention_mode]}, not ctxjax.eval.generate")
  if cfg.attention_mode not in CACHED_MODES:
    raise ValueError(f"model.attention_mode={cfg.attention_mode!r} has no key/value-cache "
                     f"decoding (LongNet's dilated segments are a training/prefill kernel); "
                     f"generation supports attention_mode in "
                     f"{[m for m in CACHED_MODES.names() if m not in OWN_DECODER]}")


def cached_attention(cfg, scheme, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT,
                     k_cache, v_cache, p: kv_cache.Plan):
  """-> (out [B, T, H, D], k_cache, v_cache) for unrotated q/k/v of this call's tokens."""
  rotated, step = CACHED_MODES.get(cfg.attention_mode)
  if rotated:
    q_rot, k_store = _rotate(cfg, scheme, q_BTHD, k_BTKD, positions_BT, positions_BT)
  else:
    q_rot, k_store = q_BTHD, k_BTKD
  if p.prefill:  # the prompt attends to itself with the configured kernel, then is stored
    mode = attention_modes.MODES[cfg.attention_mode]
    out = mode.run(cfg, scheme, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, False)
    return (out, *kv_cache.write(k_cache, v_cache, k_store, v_BTKD, p))
  return step(cfg, scheme, q_rot, k_store, v_BTKD, k_cache, v_cache, positions_BT,
              segment_ids_BT, p)
