"""Greedy generation and scoring for landmark models (Mohtashami & Jaggi 2023, Section 3.2).

`ctxjax.eval.generate` refuses attention_mode="landmark" (its key/value cache has no landmark
decode step: ctxjax/model/cached_attention.py). Here a landmark model reads a prompt of any
length: landmarks are inserted after every mem_freq content tokens (as in training) and every
layer's every head retrieves its top_k past blocks per query (the model's train=False path,
ctxjax/attention/landmark.py), so memory stays linear in the context length.

No key/value cache: each new token re-runs the model over the whole (fixed-size, jitted once)
buffer, so a token costs one forward pass over prompt + new tokens. That is fine for short
answers (passkeys, needles); a cached landmark decode step is not implemented.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ctxjax.attention.landmark import landmark_slots, with_landmarks


def _options(model):
  cfg = model.cfg
  if cfg.attention_mode != "landmark":
    raise ValueError(f"landmark generation needs model.attention_mode='landmark', got "
                     f"{cfg.attention_mode!r}; use ctxjax.eval.generate")
  opts = cfg.attention_options
  return opts["mem_freq"], opts["landmark_token_id"]


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, variables, slots_BM):
  b, m = slots_BM.shape
  positions = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m))
  return model.apply(variables, slots_BM, positions, jnp.ones_like(slots_BM))


def content_logits(model, variables, tokens_BN) -> jax.Array:
  """Logits [B, N, V] at the content tokens of rows of N content ids (landmarks inserted and
  dropped again): logits[:, t] predicts content token t + 1, as a plain model's would."""
  mem_freq, landmark_id = _options(model)
  tokens = np.asarray(tokens_BN, np.int32)
  slots = with_landmarks(tokens, mem_freq, landmark_id)
  keep = ~landmark_slots(slots.shape[1], mem_freq)
  return _logits(model, variables, jnp.asarray(slots))[:, keep]


def landmark_generate(model, variables, prompt_tokens, max_new_tokens: int) -> np.ndarray:
  """Greedy continuation of prompts [B, L] of content ids (every row the same length L, which
  may exceed the training length): returns [B, L + max_new_tokens] content ids."""
  mem_freq, landmark_id = _options(model)
  prompt = np.asarray(prompt_tokens, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0 or max_new_tokens < 1:
    raise ValueError(f"need prompt_tokens [batch, length >= 1] and max_new_tokens >= 1, got "
                     f"shape {prompt.shape} and {max_new_tokens}")
  if prompt.min() < 0 or prompt.max() >= model.cfg.vocab_size or (prompt == landmark_id).any():
    raise ValueError(f"prompt token ids must lie in [0, vocab_size={model.cfg.vocab_size}) "
                     f"and not be the landmark id {landmark_id}")
  n = prompt.shape[1] + max_new_tokens
  tokens = np.concatenate([prompt, np.zeros((prompt.shape[0], max_new_tokens), np.int32)], 1)
  slots = with_landmarks(tokens, mem_freq, landmark_id)
  content = np.flatnonzero(~landmark_slots(slots.shape[1], mem_freq))
  for t in range(prompt.shape[1], n):  # causal: the zeros after slot content[t-1] are unseen
    logits = _logits(model, variables, jnp.asarray(slots))[:, content[t - 1]]
    logits = logits.at[:, landmark_id].set(-jnp.inf)  # never emit the landmark itself
    tokens[:, t] = np.asarray(jnp.argmax(logits, axis=-1))
    slots[:, content[t]] = tokens[:, t]
  return tokens
