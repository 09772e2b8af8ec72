"""Key/value caches for decoding: explicit data handed to and returned by the model.

A cache holds, per layer, the keys and values of the tokens seen so far in `capacity` slots,
and, shared by every layer, each slot's position id, whether it holds a token (`valid`, used as
the keys' segment id: 0 never matches a query) and each row's token count (`length` [B]).

Slots are filled in order; a *bounded* cache keeps the first `n_first` tokens and the last
`n_last` in a ring buffer, so its memory is constant on an unbounded stream. That is exact for
patterns that can never show an evicted key to a later query (`Pattern.cache_window`):
StreamingLLM's attention sinks (Xiao et al. 2024: sink tokens + recent window), LM-Infinite's
Lambda mask (Han et al. 2024: n_global + n_local), Mistral's sliding window and xPos's
block-causal inference (Sun et al. 2023: the current and the previous block). Positions stay the tokens'
own position ids (no re-assignment inside the cache), so decoding with a cache gives the same
logits as one forward pass over the whole sequence.

One call of the model with a cache is either a *prefill* (several tokens, from an empty cache:
the prompt attends to itself with the configured kernel, then its keys are stored) or a
*decode step* (one token per row: stored first, then attends to the cache). Rows are
right-padded: a row's real tokens come first and carry segment id != 0.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


def window_of(cfg) -> tuple[int, int] | None:
  """(n_first, n_last) of a bounded cache for this model, or None when it needs every key."""
  if cfg.attention_mode == "lm_infinite":
    opts = dict(cfg.attention_options)
    return opts["n_global"], opts["n_local"]
  if cfg.attention_mode not in ("standard", "s2"):
    return None
  return cfg.attention_pattern.cache_window()


@flax.struct.dataclass
class KVCache:
  """k, v: per layer [B, K, C, D] (a tuple of arrays, or one [L, B, K, C, D] array under
  scan_layers), heads-major so a decode step's q.k and p.v are plain batched matmuls over
  (batch, kv head) with no per-step transpose of the cache; positions, valid: int32 [B, C]; length: int32 [B] tokens seen per row.
  A bounded cache keeps the first n_first tokens and the last n_last (n_first + n_last = C)."""
  k: Any
  v: Any
  positions: jax.Array
  valid: jax.Array
  length: jax.Array
  n_first: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def capacity(self) -> int:
    return self.positions.shape[1]

  @property
  def n_last(self) -> int:
    return self.capacity - self.n_first

  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


def cache_capacity(cfg, total_tokens: int) -> tuple[int, int]:
  """(capacity, n_first) of a cache for sequences of up to `total_tokens` tokens."""
  window = window_of(cfg)
  if window is None or sum(window) >= total_tokens:
    return total_tokens, 0
  return sum(window), window[0]


def init_cache(cfg, batch: int, capacity: int, *, n_first: int = 0, dtype=None) -> KVCache:
  """An empty cache in the model's compute dtype (`dtype` overrides)."""
  if not 0 <= n_first < capacity:
    raise ValueError(f"a cache needs 0 <= n_first < capacity, got n_first={n_first}, "
                     f"capacity={capacity}")
  dtype = dtype or cfg.compute_dtype
  shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
  if cfg.scan_layers:
    k, v = (jnp.zeros((cfg.num_hidden_layers, *shape), dtype) for _ in range(2))
  else:  # separate buffers: each is updated in place (and may be donated)
    k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
            for _ in range(2))
  zeros = jnp.zeros((batch, capacity), jnp.int32)
  return KVCache(k=k, v=v, positions=zeros, valid=zeros, length=jnp.zeros((batch,), jnp.int32),
                 n_first=n_first)


@flax.struct.dataclass
class Plan:
  """Where this call's tokens go, decided once for every layer. Decode: `slot` [B] (one new
  token per row). Prefill: `source` [B, C], the token index each slot takes (-1: empty).
  positions/valid/length: the cache's slot data after the write."""
  prefill: bool = flax.struct.field(pytree_node=False)
  slot: Any
  source: Any
  positions: jax.Array
  valid: jax.Array
  length: jax.Array


def _slot_of(length, n_first: int, n_last: int):
  """Slot of the token with index `length` (0-based) in a row: in order, then a ring over the
  last n_last slots."""
  ring = n_first + jnp.remainder(length - n_first, n_last)
  return jnp.where(length < n_first + n_last, length, ring)


def plan(cache: KVCache, positions_BT, segment_ids_BT) -> Plan:
  batch, length = positions_BT.shape
  real_BT = (segment_ids_BT != 0).astype(jnp.int32)
  rows = jnp.arange(batch)
  if length == 1:  # decode step
    slot = _slot_of(cache.length, cache.n_first, cache.n_last)
    put = lambda x_BC, new_B: x_BC.at[rows, slot].set(new_B, mode="promise_in_bounds")
    return Plan(prefill=False, slot=slot, source=None,
                positions=put(cache.positions, positions_BT[:, 0]),
                valid=put(cache.valid, real_BT[:, 0]),
                length=cache.length + real_BT[:, 0])
  # Prefill from an empty cache: slot j holds the latest token t < n with slot_of(t) = j.
  n_B1 = jnp.sum(real_BT, axis=1, keepdims=True)
  j_C = jnp.arange(cache.capacity)[None, :]
  latest = n_B1 - 1 - jnp.remainder(n_B1 - 1 - j_C, cache.n_last)
  source = jnp.where(j_C < cache.n_first, jnp.where(j_C < n_B1, j_C, -1),
                     jnp.where(latest >= cache.n_first, latest, -1))
  safe = jnp.clip(source, 0, length - 1)
  valid = (source >= 0).astype(jnp.int32)
  return Plan(prefill=True, slot=None, source=source,
              positions=jnp.take_along_axis(positions_BT, safe, axis=1) * valid,
              valid=valid, length=n_B1[:, 0])


def write(k_cache, v_cache, k_BTKD, v_BTKD, p: Plan):
  """The layer's [B, K, C, D] cache arrays after storing this call's [B, T, K, D] keys/values
  (in the cache's dtype)."""
  k_BTKD, v_BTKD = k_BTKD.astype(k_cache.dtype), v_BTKD.astype(v_cache.dtype)
  if not p.prefill:
    return _put_rows(k_cache, k_BTKD, p.slot), _put_rows(v_cache, v_BTKD, p.slot)
  idx = jnp.clip(p.source, 0, k_BTKD.shape[1] - 1)[:, :, None, None]
  keep = (p.source >= 0)[:, :, None, None]
  take = lambda x: jnp.where(keep, jnp.take_along_axis(x, idx, axis=1), 0).transpose(0, 2, 1, 3)
  return take(k_BTKD), take(v_BTKD)


def _put_rows(cache_BKCD, x_B1KD, slot_B):
  """cache[b, :, slot[b]] = x[b, 0] for every row, as one dynamic_update_slice per row: XLA
  updates those in place inside the decode loop, where a scatter (what `.at[rows, :, slot]`
  lowers to) makes it copy the whole cache every step."""
  x_BK1D = x_B1KD.transpose(0, 2, 1, 3)
  for b in range(cache_BKCD.shape[0]):
    cache_BKCD = jax.lax.dynamic_update_slice(cache_BKCD, x_BK1D[b:b + 1], (b, 0, slot_B[b], 0))
  return cache_BKCD


def updated(cache: KVCache, p: Plan, k, v) -> KVCache:
  return cache.replace(k=k, v=v, positions=p.positions, valid=p.valid, length=p.length)
