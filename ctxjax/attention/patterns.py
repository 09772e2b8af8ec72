"""Attention patterns: which key may a query see, as a function of their positions.

A pattern is data (a frozen dataclass) with two views of the same rule:
  * `mask(q_pos, k_pos)`: elementwise boolean, broadcasting — the oracle used by `reference`;
  * `block_visible(q_lo, q_hi, k_lo, k_hi)`: may ANY pair in a query block [q_lo, q_hi] and a key
    block [k_lo, k_hi] be visible? Blockwise/ring kernels skip blocks for which this is False, so
    a windowed pattern costs O(T*w), not O(T^2). It must never return False for a block that
    holds a visible pair (a conservative True is always correct).
Positions are the model's position ids (global, after any load-balancing reorder), so patterns
stay exact under chunking, packing and ring sharding. Segment masking is separate and always on.

Adding a pattern = one dataclass registered with @register_pattern.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from ctxjax.registry import Registry, unknown_choice

PATTERNS: Registry[type] = Registry("model.attention_pattern.kind")


def register_pattern(name: str) -> Callable[[type], type]:
  """Class decorator: the pattern `make_pattern(name, ...)` builds (sets `cls.kind`)."""
  def wrap(cls):
    cls.kind = name
    return PATTERNS.add(name, cls)
  return wrap


class Pattern:
  kind: str = ""
  causal: bool = True

  def mask(self, q_pos, k_pos):
    raise NotImplementedError

  def block_visible(self, q_lo, q_hi, k_lo, k_hi):
    return jnp.asarray(True)

  def cache_window(self) -> tuple[int, int] | None:
    """(n_first, n_last) when a query can only ever see keys among the first n_first positions
    and the last n_last (itself included) of a contiguous stream: a decoding cache may then
    evict every other key (ctxjax/model/kv_cache.py). None: every key may be seen again."""
    return None

  def to_dict(self) -> dict:
    return {"kind": self.kind, **dataclasses.asdict(self)}


@register_pattern("full")
@dataclasses.dataclass(frozen=True)
class Full(Pattern):
  """Bidirectional attention (encoders, prefix tests)."""
  causal = False

  def mask(self, q_pos, k_pos):
    return jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), bool)


@register_pattern("causal")
@dataclasses.dataclass(frozen=True)
class Causal(Pattern):
  """Decoder attention: key position <= query position."""

  def mask(self, q_pos, k_pos):
    return k_pos <= q_pos

  def block_visible(self, q_lo, q_hi, k_lo, k_hi):
    return k_lo <= q_hi


@register_pattern("sliding_window")
@dataclasses.dataclass(frozen=True)
class SlidingWindow(Pattern):
  """Causal attention over the last `window` positions (q - window < k <= q), Mistral-style."""
  window: int = 256

  def __post_init__(self):
    if self.window <= 0:
      raise ValueError(f"attention_pattern.window must be > 0, got {self.window}")

  def mask(self, q_pos, k_pos):
    return (k_pos <= q_pos) & (k_pos > q_pos - self.window)

  def block_visible(self, q_lo, q_hi, k_lo, k_hi):
    return (k_lo <= q_hi) & (k_hi > q_lo - self.window)

  def cache_window(self):
    return 0, self.window


class _FirstAndWindow(Pattern):
  """Causal; a key is visible iff among the first n_first positions or within the last
  `window`. Subclasses name their two fields in `_first_and_window`."""
  _first_and_window: tuple[str, str]

  def _limits(self) -> tuple[int, int]:
    first, window = self._first_and_window
    return getattr(self, first), getattr(self, window)

  def __post_init__(self):
    (first_key, window_key), (first, window) = self._first_and_window, self._limits()
    if window <= 0:
      raise ValueError(f"attention_pattern.{window_key} must be > 0, got {window}")
    if first < 0:
      raise ValueError(f"attention_pattern.{first_key} must be >= 0, got {first}")

  def mask(self, q_pos, k_pos):
    first, window = self._limits()
    return (k_pos <= q_pos) & ((k_pos > q_pos - window) | (k_pos < first))

  def block_visible(self, q_lo, q_hi, k_lo, k_hi):
    # Exact for integer ranges: the window part is SlidingWindow's test; the first-n part needs
    # a key k < first with k <= some query, i.e. k_lo < first and k_lo <= q_hi.
    first, window = self._limits()
    return (k_lo <= q_hi) & ((k_hi > q_lo - window) | (k_lo < first))

  def cache_window(self):
    return self._limits()


@register_pattern("lambda")
@dataclasses.dataclass(frozen=True)
class LambdaMask(_FirstAndWindow):
  """LM-Infinite's Lambda-shaped mask (Han et al. 2024).

  Key n is visible to query m iff m - n_local < n <= m (local branch) or n < n_global and
  n <= m - n_local (global branch), on position ids (with packing: each document's first
  n_global positions). This pattern is the mask only, with the model's normal positional
  encoding on every pair; LM-Infinite's distance ceiling (global branch seen at distance
  n_local) is `ctxjax.attention.lm_infinite.lm_infinite_attention`. Defaults follow
  `convert_llama_model(model, 4096, 10)`. Cost: O(T * (n_local + n_global)) with blocks.
  """
  n_global: int = 10
  n_local: int = 4096
  _first_and_window = ("n_global", "n_local")


@register_pattern("attention_sinks")
@dataclasses.dataclass(frozen=True)
class AttentionSinks(_FirstAndWindow):
  """StreamingLLM (Xiao et al. 2024): the first `sink_size` positions + the last `window`.

  Key k is visible to query q iff k <= q and (k < sink_size or k > q - window); the window
  includes the query itself, so `window` = StartRecentKVCache's recent_size when the cache is
  evicted before the new token is added (`evict_for_space`, the streaming demo); the
  `eval_long_ppl.py` loop evicts after the forward, so its query also sees one more key
  (window = recent_size + 1). The same mask as `lambda` with n_global = sink_size and
  n_local = window; StreamingLLM differs in positions, not in the mask: its cache re-assigns
  positions inside the cache (pos_shift), which is the decoding cache's job, not the mask's.
  """
  sink_size: int = 4
  window: int = 512
  _first_and_window = ("sink_size", "window")


@register_pattern("block_causal")
@dataclasses.dataclass(frozen=True)
class BlockCausal(Pattern):
  """xPos's blockwise causal attention at inference (Sun et al. 2023, Section 3.3).

  Positions are cut into blocks of `block_size` (block = position // block_size; set it to the
  training length); a query attends causally within its own block and to the whole previous
  block: k <= q and k // block_size >= q // block_size - 1. Each query sees between
  block_size and 2 * block_size - 1 keys (fewer at the start).
  """
  block_size: int = 1024

  def __post_init__(self):
    if self.block_size <= 0:
      raise ValueError(f"attention_pattern.block_size must be > 0, got {self.block_size}")

  def mask(self, q_pos, k_pos):
    return (k_pos <= q_pos) & (k_pos // self.block_size >= q_pos // self.block_size - 1)

  def block_visible(self, q_lo, q_hi, k_lo, k_hi):
    # Exact for integer ranges: a visible pair exists iff k_lo <= q_hi and the largest usable
    # key, min(k_hi, q_hi), is in or after the block before q_lo's (taking q = max(q_lo, k)).
    k_best = jnp.minimum(k_hi, q_hi)
    return (k_lo <= q_hi) & (k_best // self.block_size >= q_lo // self.block_size - 1)

  def cache_window(self):
    return 0, 2 * self.block_size  # the current and the previous block, at most


def make_pattern(kind: str = "causal", **kwargs) -> Pattern:
  """Build a pattern from config data: make_pattern("sliding_window", window=128)."""
  cls = PATTERNS.get(kind)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"attention_pattern {kind!r} got unknown keys {unknown}: "
                     + unknown_choice("model.attention_pattern key", unknown[0], fields))
  return cls(**kwargs)
