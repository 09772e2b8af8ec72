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

PATTERNS: dict[str, type] = {}


def register_pattern(name: str) -> Callable[[type], type]:
  def wrap(cls):
    cls.kind = name
    PATTERNS[name] = cls
    return cls
  return wrap


class Pattern:
  kind: str = ""
  causal: bool = True

  def mask(self, q_pos, k_pos):
    raise NotImplementedError

  def block_visible(self, q_lo, q_hi, k_lo, k_hi):
    return jnp.asarray(True)

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


def make_pattern(kind: str = "causal", **kwargs) -> Pattern:
  """Build a pattern from config data: make_pattern("sliding_window", window=128)."""
  if kind not in PATTERNS:
    raise ValueError(f"attention_pattern.kind={kind!r}; valid choices: {sorted(PATTERNS)}")
  cls = PATTERNS[kind]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"attention_pattern {kind!r} got unknown keys {unknown}; "
                     f"valid keys: {sorted(fields)}")
  return cls(**kwargs)
