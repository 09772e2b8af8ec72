"""Inference of a memory model over an input of any length: window by window, the memory
(one KNNMemory per memory layer, knn_memory.py) carried as explicit state between calls.

  memory = init_memory(cfg, batch)
  logits, memory = run_windows(model, params, tokens_BT, memory)   # T any multiple of W
  tokens = generate(model, params, prompt_BT, max_new_tokens)      # greedy

Each full window of W = `model.memory_window` tokens runs at positions 0..W-1; its memory layers
search the memory (exact top-k unless model.memory_search = approx), then write the window's
keys/values (FIFO). This is the training forward of memory_layer.py run one window at a time,
so both give the same logits (tests/test_memory_layers.py). Generation keeps the unfinished
window as local context and commits it to the memory when it fills, as LongLLaMA's
last_context_length window does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ctxjax import xla_options
from ctxjax.model import knn_memory, memory_model


def init_memory(cfg, batch: int) -> dict:
  """The empty "memory" collection of a memory model for `batch` rows."""
  state = knn_memory.init(batch, cfg.memory_size, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.compute_dtype)
  tree: dict = {}
  for path in memory_model.memory_paths(cfg):
    node = tree
    for name in path:
      node = node.setdefault(name, {})
    node["state"] = state
  return tree


@functools.partial(xla_options.jit, static_argnums=0)
def _window(model, params, memory, tokens_BW):
  logits, new = model.apply({"params": params, "memory": memory}, tokens_BW,
                            mutable=["memory"])
  return logits, new["memory"]


def _check(cfg):
  if cfg.memory_kind == "none":
    raise ValueError("model.memory_kind='none': this model has no memory; decode it with "
                     "ctxjax.eval.generation")


def run_windows(model, params, tokens_BT, memory=None):
  """(logits [B, T, V], memory after the input) reading `tokens_BT` window by window."""
  cfg = model.cfg
  _check(cfg)
  batch, length = tokens_BT.shape
  window = cfg.memory_window
  if length % window:
    raise ValueError(f"input length {length} must be a multiple of model.memory_window="
                     f"{window} (generate() handles the unfinished window)")
  memory = init_memory(cfg, batch) if memory is None else memory
  out = []
  for start in range(0, length, window):
    logits, memory = _window(model, params, memory, tokens_BT[:, start:start + window])
    out.append(logits)
  return jnp.concatenate(out, axis=1), memory


def generate(model, params, prompt_BT, max_new_tokens: int) -> np.ndarray:
  """Greedy continuation [B, max_new_tokens] of `prompt_BT` (any length >= 1)."""
  cfg = model.cfg
  _check(cfg)
  window = cfg.memory_window
  prompt = np.asarray(prompt_BT)
  full = (prompt.shape[1] // window) * window
  if prompt.shape[1] == full:  # keep at least one token as local context
    full -= window
  memory = init_memory(cfg, prompt.shape[0])
  if full:
    _, memory = run_windows(model, params, jnp.asarray(prompt[:, :full]), memory)
  pending = prompt[:, full:]
  new = []
  for _ in range(max_new_tokens):
    n = pending.shape[1]
    padded = np.pad(pending, ((0, 0), (0, window - n)))
    logits, written = _window(model, params, memory, jnp.asarray(padded))
    token = np.asarray(jnp.argmax(logits[:, n - 1], axis=-1))[:, None]
    new.append(token)
    if n == window:  # the local window is full: it becomes memory
      memory, pending = written, token
    else:
      pending = np.concatenate([pending, token], axis=1)
  return np.concatenate(new, axis=1)


def generate_fn(model, variables, prompt_tokens, max_new_tokens: int, *,
                temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                prompt_lengths=None, eos_id: int | None = None) -> np.ndarray:
  """`generate` behind ctxjax.eval.generation.generate's signature, for the retrieval grids
  (ctxjax/eval/retrieval.py): greedy, equal-length prompts; -> [B, prompt + new]."""
  del seed, eos_id  # greedy; the grid cuts at eos itself
  prompt = np.asarray(prompt_tokens, np.int32)
  if temperature != 0.0 or top_p != 1.0:
    raise ValueError("memory models decode greedily: temperature=0, top_p=1")
  if prompt_lengths is not None and np.any(np.asarray(prompt_lengths) != prompt.shape[1]):
    raise ValueError("memory models decode equal-length prompts (prompt_lengths = prompt "
                     "length)")
  new = generate(model, variables["params"], prompt, max_new_tokens)
  return np.concatenate([prompt, new.astype(np.int32)], axis=1)
