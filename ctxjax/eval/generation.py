"""Autoregressive generation with a key/value cache, for every positional scheme and mode.

  tokens = generate(model, variables, prompt_tokens, max_new_tokens)   # greedy

Prompts are RIGHT-padded: row i's real tokens are prompt_tokens[i, :prompt_lengths[i]]
(position ids 0..n_i-1); the output is [batch, prompt_len + max_new_tokens] with the prompt
as given in the first prompt_len columns and row i's new tokens in the rest, for every row
(the padding stays where it was). After `eos_id` a row continues with `eos_id`.

Two jitted programs per (batch, prompt_len, max_new_tokens, sampling) shape: the prefill runs
the model's own attention kernel over the prompt and fills the cache, then a `lax.while_loop`
decodes one token per row per step (it stops early when every row has emitted eos).
Caches are bounded (constant memory) for attention sinks, LM-Infinite, sliding-window and
block-causal models (ctxjax/model/kv_cache.py). For sequence-length-dependent RoPE (dynamic
NTK, LongRoPE) each token's key keeps the rotation of the call that computed it, as in
transformers (ctxjax/model/cached_attention.py).

Sampling: temperature 0 is greedy (argmax; ties to the lowest id, as torch.argmax); otherwise
logits / temperature, nucleus filtering at top_p (Holtzman et al. 2020: keep the smallest set
of most likely tokens whose probability reaches top_p), and a draw from seed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ctxjax import xla_options
from ctxjax.model import cached_attention, kv_cache
from ctxjax.model import params as params_lib
from ctxjax.model.transformer import Transformer
from ctxjax.positions import schemes


def _check(cfg, prompt, lengths, max_new_tokens):
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt_tokens must be [batch, length >= 1], got shape {prompt.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if lengths.shape != (prompt.shape[0],) or lengths.min() < 1 or lengths.max() > prompt.shape[1]:
    raise ValueError(f"prompt_lengths must be [batch] ints in [1, {prompt.shape[1]}], got "
                     f"{lengths.tolist()}")
  if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
    raise ValueError(f"prompt token ids must lie in [0, vocab_size={cfg.vocab_size})")
  scheme = schemes.get_scheme(cfg.position_embedding_type)
  total = int(lengths.max()) + max_new_tokens
  if scheme.absolute is not None and total > cfg.max_position_embeddings:
    raise ValueError(f"{scheme.name} positions end at max_position_embeddings="
                     f"{cfg.max_position_embeddings}; prompt ({int(lengths.max())}) + "
                     f"max_new_tokens ({max_new_tokens}) = {total} tokens")
  cached_attention.check_cacheable(cfg)


def _pick(logits_BV, key, temperature: float, top_p: float):
  """Next token per row: argmax at temperature 0, else a nucleus sample."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
    keep_BV = before_BV < top_p  # always keeps the most likely token
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Program:
  """The jitted pieces of `generate` for one shape: `prefill` runs the prompt and picks the
  first token, `decode` the `lax.while_loop` of one-token steps (the cache updated in place
  inside it). Separate so each is compiled once and can be timed alone."""
  unroll: Callable   # variables -> the variables `prefill`/`decode` take
  prefill: Callable  # (variables, prompt_BP, lengths_B, key) -> (out_BN, cache, done_B)
  decode: Callable   # (variables, lengths_B, key, out_BN, cache, done_B) -> out_BN

  def __call__(self, variables, prompt_BP, lengths_B, key):
    variables = self.unroll(variables)
    out_BN = self.decode(variables, lengths_B, key,
                         *self.prefill(variables, prompt_BP, lengths_B, key))
    return jnp.concatenate([prompt_BP, out_BN], axis=1)


@functools.lru_cache(maxsize=32)
def _program(cfg, batch: int, prompt_len: int, max_new: int, temperature: float, top_p: float,
             eos_id: int) -> Program:
  """`generate`'s programs for one shape (cached: compiled once per shape).

  A `scan_layers` model decodes as its unrolled twin (parameters unstacked once per call, a
  copy of the weights): a scanned layer reads and writes its slice of a stacked [L, ...]
  cache, which XLA copies every step, where separate per-layer caches update in place."""
  stacked = cfg
  cfg = dataclasses.replace(cfg, scan_layers=False)
  model = Transformer(cfg)
  capacity, n_first = kv_cache.cache_capacity(cfg, prompt_len + max_new)

  def unroll(variables):
    return {**variables, "params": params_lib.unrolled(variables["params"], stacked)}

  def prefill(variables, prompt_BP, lengths_B, key):
    segment_BP = (jnp.arange(prompt_len)[None, :] < lengths_B[:, None]).astype(jnp.int32)
    positions_BP = jnp.arange(prompt_len, dtype=jnp.int32)[None, :] * segment_BP
    cache = kv_cache.init_cache(cfg, batch, capacity, n_first=n_first)
    logits, cache = model.apply(variables, prompt_BP, positions_BP, segment_BP, cache=cache)
    last_BV = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    out_BN = jnp.full((batch, max_new), max(eos_id, 0), jnp.int32)
    out_BN = out_BN.at[:, 0].set(_pick(last_BV, jax.random.fold_in(key, 0), temperature, top_p))
    return out_BN, cache, out_BN[:, 0] == eos_id

  def decode(variables, lengths_B, key, out_BN, cache, done_B):
    def cond(state):
      i, _, _, done_B = state
      return (i < max_new) & ~jnp.all(done_B)

    def body(state):
      i, out_BN, cache, done_B = state
      token_B = out_BN[:, i - 1]
      logits, cache = model.apply(variables, token_B[:, None], (lengths_B + i - 1)[:, None],
                                  jnp.ones((batch, 1), jnp.int32), cache=cache)
      nxt_B = _pick(logits[:, 0], jax.random.fold_in(key, i), temperature, top_p)
      nxt_B = jnp.where(done_B, eos_id, nxt_B)
      return i + 1, out_BN.at[:, i].set(nxt_B), cache, done_B | (nxt_B == eos_id)

    return jax.lax.while_loop(cond, body, (jnp.int32(1), out_BN, cache, done_B))[1]

  return Program(unroll=xla_options.jit(unroll) if stacked.scan_layers else (lambda v: v),
                 prefill=xla_options.jit(prefill), decode=xla_options.jit(decode))


def compiled(model, batch: int, prompt_len: int, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None) -> Program:
  """The Program `generate` runs for this shape (its prefill and decode can be timed alone,
  as benchmarks/generate.py does)."""
  return _program(model.cfg, int(batch), int(prompt_len), int(max_new_tokens),
                  float(temperature), float(top_p), -1 if eos_id is None else int(eos_id))


def generate(model, variables, prompt_tokens, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, prompt_lengths=None, eos_id: int | None = None):
  """-> int32 [batch, prompt_len + max_new_tokens] (see the module docstring)."""
  cfg = model.cfg
  prompt = np.asarray(prompt_tokens, np.int32)
  if prompt.ndim == 1:
    prompt = prompt[None]
  lengths = (np.full((prompt.shape[0],), prompt.shape[1], np.int32) if prompt_lengths is None
             else np.asarray(prompt_lengths, np.int32).reshape(-1))
  _check(cfg, prompt, lengths, max_new_tokens)
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature="
                     f"{temperature}, top_p={top_p}")
  program = compiled(model, prompt.shape[0], prompt.shape[1], max_new_tokens,
                     temperature=temperature, top_p=top_p, eos_id=eos_id)
  return program(variables, jnp.asarray(prompt), jnp.asarray(lengths), jax.random.PRNGKey(seed))
