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
A prefill runs the mode's own kernel over the prompt (any `attention_impl`); a decode step
attends one query per row to the cache with the dense `reference` kernel, which reads each
cached key once.
"""
from __future__ import annotations

import functools

from ctxjax import attention
from ctxjax.attention.lm_infinite import lm_infinite_attention
from ctxjax.model import attention_modes, kv_cache
from ctxjax.registry import Registry

_DECODE_IMPL = "reference"

# attention_mode -> (stores rotated keys?, decode-step attention)
CACHED_MODES: Registry = Registry("model.attention_mode")


def _rotate(cfg, scheme, q, k, q_positions, k_positions):
  if scheme.rotate_qk is None:
    return q, k
  return scheme.rotate_qk(cfg, q, k, q_positions, k_positions, center=0)


def _standard_step(cfg, scheme, q_rot, k_cache, v_cache, positions, segment_ids, p):
  return attention.attend(q_rot, k_cache, v_cache, q_positions=positions,
                          k_positions=p.positions, q_segment_ids=segment_ids,
                          k_segment_ids=p.valid, pattern=cfg.attention_pattern,
                          alibi_slopes=scheme.alibi_slopes(cfg.num_attention_heads),
                          impl=_DECODE_IMPL)


def _lm_infinite_step(cfg, scheme, q, k_cache, v_cache, positions, segment_ids, p):
  opts = dict(cfg.attention_options)
  return lm_infinite_attention(q, k_cache, v_cache, positions=positions,
                               segment_ids=segment_ids, k_positions=p.positions,
                               k_segment_ids=p.valid, n_global=opts["n_global"],
                               n_local=opts["n_local"],
                               rotate_qk=functools.partial(scheme.rotate_qk, cfg),
                               impl=_DECODE_IMPL)


CACHED_MODES.add("standard", (True, _standard_step))
CACHED_MODES.add("s2", (True, _standard_step))
CACHED_MODES.add("lm_infinite", (False, _lm_infinite_step))


def check_cacheable(cfg) -> None:
  """One line naming the mode when this model cannot decode with a cache."""
  if cfg.attention_mode not in CACHED_MODES:
    raise ValueError(f"model.attention_mode={cfg.attention_mode!r} has no key/value-cache "
                     f"decoding (LongNet's dilated segments are a training/prefill kernel); "
                     f"generation supports attention_mode in {CACHED_MODES.names()}")


def cached_attention(cfg, scheme, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT,
                     k_cache, v_cache, p: kv_cache.Plan):
  """-> (out [B, T, H, D], k_cache, v_cache) for unrotated q/k/v of this call's tokens."""
  rotated, step = CACHED_MODES.get(cfg.attention_mode)
  if rotated:
    q_rot, k_store = _rotate(cfg, scheme, q_BTHD, k_BTKD, positions_BT, positions_BT)
  else:
    q_rot, k_store = q_BTHD, k_BTKD
  k_cache, v_cache = kv_cache.write(k_cache, v_cache, k_store, v_BTKD, p)
  if p.prefill:  # the prompt attends to itself with the configured kernel
    mode = attention_modes.MODES[cfg.attention_mode]
    out = mode.run(cfg, scheme, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, False)
  else:
    out = step(cfg, scheme, q_rot if rotated else q_BTHD, k_cache, v_cache, positions_BT,
               segment_ids_BT, p)
  return out, k_cache, v_cache
