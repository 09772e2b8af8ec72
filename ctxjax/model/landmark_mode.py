"""The "landmark" attention mode (Mohtashami & Jaggi 2023): how a layer runs it.

Options (model.attention_options): mem_freq (ordinary tokens per block; one landmark follows
each block), top_k (past blocks each query retrieves at inference), landmark_token_id (the
vocabulary id reserved for the landmark; ctxjax/data/landmark.py inserts it, the attention
itself reads block boundaries from the slot index). Training (train=True) runs the grouped
softmax over every past block; evaluation and generation (train=False) run the paper's top-k
retrieval. Kernels: "reference" (dense definition) or "blockwise"/"auto" (linear memory),
ctxjax/attention/landmark.py.

With a key/value cache (ctxjax/model/kv_cache.py; the paper's inference, Section 3.2) the cache
holds every slot, landmarks included, at its slot index, so block boundaries stay where the slot
index puts them: the prefill runs `run` over the prompt's slots, and `decode_step` stores one
new slot and runs its query against the cache (`landmark_decode`, the blockwise kernel's
formula for that query, whatever attention_impl the prefill used). The slots themselves, the
landmarks inserted, come from ctxjax/model/landmark_generate.py.
"""
from __future__ import annotations

import jax.numpy as jnp

from ctxjax.attention import landmark as landmark_attention
from ctxjax.model import kv_cache

OPTIONS = {"mem_freq": int, "top_k": int, "landmark_token_id": int}
KERNELS = ("reference", "blockwise", "auto")


def run(cfg, scheme, q, k, v, positions, segment_ids, training):
  """attention_modes.Mode.run for attention_mode="landmark"."""
  if scheme.rotate_qk is not None:
    q, k = scheme.rotate_qk(cfg, q, k, positions, positions)
  opts = cfg.attention_options
  impl = "blockwise" if cfg.attention_impl == "auto" else cfg.attention_impl
  return landmark_attention.IMPLEMENTATIONS.get(impl)(
      q, k, v, segment_ids=segment_ids, mem_freq=opts["mem_freq"],
      top_k=None if training else opts["top_k"])


def decode_step(cfg, scheme, q_rot, k_new, v_new, k_cache, v_cache, positions, segment_ids, p):
  """cached_attention's decode step for attention_mode="landmark": the new slot's rotated key
  and value go to its cache slot (p.slot: the slot index in the row), then its query retrieves
  the top_k past blocks from the [B, K, C, D] cache. -> (out [B, 1, H, D], k_cache, v_cache)."""
  del scheme, positions  # q_rot/k_new come rotated (cached_attention); blocks: the slot index
  k_cache, v_cache = kv_cache.write(k_cache, v_cache, k_new, v_new, p)
  opts = cfg.attention_options
  out = landmark_attention.landmark_decode(
      q_rot, jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2), slot=p.slot,
      segment_ids=segment_ids, k_segment_ids=p.valid, mem_freq=opts["mem_freq"],
      top_k=opts["top_k"])
  return out, k_cache, v_cache
