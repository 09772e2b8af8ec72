"""The "landmark" attention mode (Mohtashami & Jaggi 2023): how a layer runs it.

Options (model.attention_options): mem_freq (ordinary tokens per block; one landmark follows
each block), top_k (past blocks each query retrieves at inference), landmark_token_id (the
vocabulary id reserved for the landmark; ctxjax/data/landmark.py inserts it, the attention
itself reads block boundaries from the slot index). Training (train=True) runs the grouped
softmax over every past block; evaluation and generation (train=False) run the paper's top-k
retrieval. Kernels: "reference" (dense definition) or "blockwise"/"auto" (linear memory),
ctxjax/attention/landmark.py.
"""
from __future__ import annotations

from ctxjax.attention import landmark as landmark_attention

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
