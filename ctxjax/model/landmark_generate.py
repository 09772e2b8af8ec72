"""Greedy generation and scoring for landmark models (Mohtashami & Jaggi 2023, Section 3.2).

`ctxjax.eval.generate` refuses attention_mode="landmark" (it would feed the content tokens
only). Here a landmark model reads a prompt of any length: landmarks are inserted after every
mem_freq content tokens (as in training) and every layer's every head retrieves its top_k past
blocks per query (the model's train=False path, ctxjax/attention/landmark.py), so memory stays
linear in the context length.

The paper's inference keeps a key/value cache of every slot. `prefill` runs the prompt's slots
once and returns that cache (every layer's k/v of every slot, landmarks included, sized for all
slots of prompt + answer, whole blocks); `decode_step` feeds one slot, a token or a landmark:
its k/v go to the cache at its slot index and its query retrieves the top_k past blocks from the
cache (ctxjax/model/landmark_mode.py). `landmark_generate` runs both in one jitted program per
shape, the steps in a `lax.fori_loop` (no host round trip per token; the cache is updated in
place in the loop carry): when a token completes a block it also feeds the landmark slot
(logits unused), exactly where `with_landmarks` places it. A token then costs one query per
layer against the cache instead of a forward pass over the whole buffer.

`landmark_generate_uncached` is the reference it is tested against (tests/test_landmark_cache.py):
each new token re-runs the model over the whole (fixed-size, jitted once) buffer. The two give
the same tokens wherever the cache is exact: positional schemes whose rotation does not depend
on the sequence length. Under dynamic NTK or LongRoPE a cached key keeps the rotation of the call
that computed it (ctxjax/model/cached_attention.py), while the uncached path rotates every slot
with the whole buffer's length.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ctxjax import xla_options
from ctxjax.attention.landmark import landmark_slots, with_landmarks
from ctxjax.model import kv_cache
from ctxjax.model import params as params_lib
from ctxjax.model.transformer import Transformer


def _options(model):
  cfg = model.cfg
  if cfg.attention_mode != "landmark":
    raise ValueError(f"landmark generation needs model.attention_mode='landmark', got "
                     f"{cfg.attention_mode!r}; use ctxjax.eval.generate")
  opts = cfg.attention_options
  return opts["mem_freq"], opts["landmark_token_id"]


@functools.partial(xla_options.jit, static_argnums=0)
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


def cache_capacity(mem_freq: int, n_slots: int) -> int:
  """Cache slots for rows of n_slots slots: whole blocks of mem_freq + 1."""
  return -(-n_slots // (mem_freq + 1)) * (mem_freq + 1)


@functools.partial(xla_options.jit, static_argnums=(0, 3))
def prefill(model, variables, slots_BP, capacity: int):
  """The prompt's slots [B, P] (landmarks inserted, slot index = position) run once ->
  (logits [B, P, V], cache): a kv_cache.KVCache of `capacity` slots (cache_capacity) holding
  every layer's k/v of the P slots."""
  b, p = slots_BP.shape
  cache = kv_cache.init_cache(model.cfg, b, capacity)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  return model.apply(variables, slots_BP, positions, jnp.ones_like(slots_BP), cache=cache)


@functools.partial(xla_options.jit, static_argnums=0)
def decode_step(model, variables, slot_B, cache):
  """One slot per row (a content id or the landmark id) at the row's next slot, cache.length
  (= its position) -> (logits [B, V], cache with its k/v stored)."""
  positions = cache.length[:, None]
  logits, cache = model.apply(variables, slot_B[:, None], positions,
                              jnp.ones_like(positions), cache=cache)
  return logits[:, 0], cache


def _pick(logits_BV, landmark_id: int):
  """Greedy next content token: never the landmark itself."""
  return jnp.argmax(logits_BV.at[:, landmark_id].set(-jnp.inf), axis=-1).astype(jnp.int32)


@functools.partial(xla_options.jit, static_argnums=(0, 3, 4))
def _greedy(model, variables, slots_BM, n_prompt: int, last: int):
  """slots [B, M] with the prompt in its first n_prompt slots and the landmarks at theirs ->
  the slots with greedy tokens at every content slot up to `last` (the final token's)."""
  mem_freq, landmark_id = _options(model)
  is_mark = jnp.asarray(landmark_slots(slots_BM.shape[1], mem_freq))
  prompt_content = np.flatnonzero(~landmark_slots(n_prompt, mem_freq))[-1]
  logits, cache = prefill(model, variables, slots_BM[:, :n_prompt],
                          cache_capacity(mem_freq, slots_BM.shape[1]))
  next_B = _pick(logits[:, prompt_content], landmark_id)

  def body(j, state):  # slot j: the pending token, or the landmark (logits unused)
    slots_BM, cache, next_B = state
    slot_B = jnp.where(is_mark[j], landmark_id, next_B)
    logits_BV, cache = decode_step(model, variables, slot_B, cache)
    next_B = jnp.where(is_mark[j], next_B, _pick(logits_BV, landmark_id))
    return slots_BM.at[:, j].set(slot_B), cache, next_B

  slots_BM, _, next_B = jax.lax.fori_loop(n_prompt, last, body, (slots_BM, cache, next_B))
  return slots_BM.at[:, last].set(next_B)


def _unrolled(model, variables):
  """A scan_layers model as its unrolled twin (a copy of the weights), as ctxjax.eval.generate
  decodes: a scanned layer's slice of a stacked cache is copied every step."""
  if not model.cfg.scan_layers:
    return model, variables
  flat = Transformer(dataclasses.replace(model.cfg, scan_layers=False))
  return flat, {**variables, "params": params_lib.unrolled(variables["params"], model.cfg)}


def _check_prompt(model, prompt_tokens, max_new_tokens: int) -> np.ndarray:
  _, landmark_id = _options(model)
  prompt = np.asarray(prompt_tokens, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0 or max_new_tokens < 1:
    raise ValueError(f"need prompt_tokens [batch, length >= 1] and max_new_tokens >= 1, got "
                     f"shape {prompt.shape} and {max_new_tokens}")
  if prompt.min() < 0 or prompt.max() >= model.cfg.vocab_size or (prompt == landmark_id).any():
    raise ValueError(f"prompt token ids must lie in [0, vocab_size={model.cfg.vocab_size}) "
                     f"and not be the landmark id {landmark_id}")
  return prompt


def _buffer(model, prompt_tokens, max_new_tokens: int):
  """(prompt [B, L], tokens [B, L + new] with zeros for the answer, their slots [B, M] with the
  landmarks inserted, the content slots' indices [L + new])."""
  mem_freq, landmark_id = _options(model)
  prompt = _check_prompt(model, prompt_tokens, max_new_tokens)
  tokens = np.concatenate([prompt, np.zeros((prompt.shape[0], max_new_tokens), np.int32)], 1)
  slots = with_landmarks(tokens, mem_freq, landmark_id)
  return prompt, tokens, slots, np.flatnonzero(~landmark_slots(slots.shape[1], mem_freq))


def landmark_generate(model, variables, prompt_tokens, max_new_tokens: int) -> np.ndarray:
  """Greedy continuation of prompts [B, L] of content ids (every row the same length L, which
  may exceed the training length): returns [B, L + max_new_tokens] content ids. One prefill,
  then one cached decode step per slot (module doc)."""
  mem_freq, landmark_id = _options(model)
  prompt, tokens, slots, content = _buffer(model, prompt_tokens, max_new_tokens)
  n = tokens.shape[1]
  n_prompt = with_landmarks(prompt[:1], mem_freq, landmark_id).shape[1]
  flat, flat_variables = _unrolled(model, variables)
  slots = _greedy(flat, flat_variables, jnp.asarray(slots), n_prompt, int(content[n - 1]))
  return np.asarray(slots)[:, content]


def landmark_generate_uncached(model, variables, prompt_tokens,
                               max_new_tokens: int) -> np.ndarray:
  """`landmark_generate` without a cache, the reference: each new token re-runs the model over
  the whole buffer of prompt + answer slots (the zeros after the current slot are unseen)."""
  _, landmark_id = _options(model)
  prompt, tokens, slots, content = _buffer(model, prompt_tokens, max_new_tokens)
  for t in range(prompt.shape[1], tokens.shape[1]):  # causal: the zeros after slot content[t-1] are unseen
    logits = _logits(model, variables, jnp.asarray(slots))[:, content[t - 1]]
    tokens[:, t] = np.asarray(_pick(logits, landmark_id))
    slots[:, content[t]] = tokens[:, t]
  return tokens
