"""Embeddings from the ctxjax model itself: the mean over a text's tokens of the final hidden
states (after the last RMSNorm, the vectors the LM head reads), as MemGPT's archival search
and Think-in-Memory's hash want an embedding function and the issue asks for the model's own.

  embed = hidden_state_embedder(model, variables, tokenizer, max_tokens=64)
  vectors = embed(["some text", ...])     # float32 [N, hidden_size]

The model is applied unchanged with flax's `capture_intermediates` keeping the output of the
top-level `norm` module, so logits and every other output stay as they were. Texts are
tokenized with bos, cut to their first `max_tokens` tokens and right-padded to one shape (one
compiled program); padding is excluded from the mean and, being after the real tokens, cannot
affect them under causal attention.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ctxjax import xla_options


def final_hidden(model, variables, tokens_BT, segment_ids_BT):
  """The final normed hidden states [B, T, E] of `model` (a ctxjax Transformer)."""
  _, state = model.apply(
      variables, tokens_BT, None, segment_ids_BT,
      capture_intermediates=lambda mdl, method: (mdl.name == "norm" and method == "__call__"
                                                 and len(mdl.scope.path) == 1),
      mutable=["intermediates"])
  return state["intermediates"]["norm"]["__call__"][0]


def mean_pool(hidden_BTE, mask_BT):
  """Mean over the positions where mask is 1 -> [B, E] float32."""
  m_BT1 = mask_BT[..., None].astype(jnp.float32)
  return jnp.sum(hidden_BTE.astype(jnp.float32) * m_BT1, 1) / jnp.maximum(m_BT1.sum(1), 1.0)


def hidden_state_embedder(model, variables, tokenizer, *, max_tokens: int = 64,
                          batch_size: int = 16):
  """embed(texts) -> float32 [N, E]: mean-pooled final hidden states (module doc)."""

  @xla_options.jit
  def pooled(variables, tokens_BT, mask_BT):
    return mean_pool(final_hidden(model, variables, tokens_BT, mask_BT), mask_BT)

  bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []

  def embed(texts: Sequence[str]) -> np.ndarray:
    rows = [(bos + tokenizer.encode(t))[:max_tokens] for t in texts]
    out = []
    for b in range(0, len(rows), batch_size):
      chunk = rows[b:b + batch_size]
      tokens = np.zeros((batch_size, max_tokens), np.int32)
      mask = np.zeros((batch_size, max_tokens), np.int32)
      for i, r in enumerate(chunk):
        tokens[i, :len(r)], mask[i, :len(r)] = r, 1
      mask[len(chunk):, 0] = 1  # filler rows: one token, never read
      out.append(np.asarray(pooled(variables, tokens, mask))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, model.cfg.hidden_size), np.float32)

  return embed
