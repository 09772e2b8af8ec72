"""LM-Infinite: Lambda-mask + distance ceiling (Han et al. 2024).

Semantics of Glaciohound/LM-Infinite `models/llama.py::attn_forward_factory` with
`convert_llama_model(model, n_local, n_global)` (limit_distance = n_local):
  * local branch, keys m - n_local < n <= m: q and k rotated normally (positions m, n);
  * global branch, keys n < n_global with n <= m - n_local: keys UNROTATED (position 0) and
    the query rotated by delta = n_local, so every global key is seen at relative distance
    n_local. (The reference uses delta = min(limit, kv_len - 1); the two agree wherever the
    global branch is non-empty, and every global pair has distance >= n_local, so this is also
    delta = min(limit, distance) pair by pair.)
  * one softmax over the union of the two (disjoint) key sets: each branch returns (out, lse)
    and `merge_partials` mixes them, exact in values and gradients.
Positions are position ids: with packing, each document's first n_global positions are its
global keys. `rotate` is the model's positional scheme; both branches are rotated in ONE call
on concatenated [real; ceiling] positions, so sequence-length-dependent scalings (dynamic NTK,
LongRoPE: seq_len = max(position) + 1) see the real length, and attention factors (YaRN) apply
to both branches alike (the global key at position 0 is k * af, consistent with af^2 logits).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ctxjax.attention.partial import attend_with_lse, merge_partials
from ctxjax.attention.patterns import Pattern, SlidingWindow


@dataclasses.dataclass(frozen=True)
class _LambdaGlobal(Pattern):
  """The global branch of the Lambda-mask alone: k < n_global and k <= q - n_local."""
  n_global: int
  n_local: int

  def mask(self, q_pos, k_pos):
    return (k_pos < self.n_global) & (k_pos <= q_pos - self.n_local)

  def block_visible(self, q_lo, q_hi, k_lo, k_hi):
    return (k_lo < self.n_global) & (k_lo <= q_hi - self.n_local)


def lm_infinite_attention(q_BTHD, k_BTKD, v_BTKD, *, positions, segment_ids, n_global: int,
                          n_local: int, rotate=None, rotate_qk=None, impl: str = "reference",
                          scale=None, k_positions=None, k_segment_ids=None):
  """LM-Infinite attention on UNROTATED q [B,T,H,D], k, v [B,S,K,D] -> [B,T,H,D].

  Give exactly one of
    rotate(x_BTHD, positions_BT) -> rotated x   (e.g. RoPE with fixed frequencies), or
    rotate_qk(q, k, q_positions, k_positions) -> (q, k)   (the model's scheme:
      `functools.partial(schemes.get_scheme(cfg.position_embedding_type).rotate_qk, cfg)`).
  positions, segment_ids: int [B, T], the queries' (and, by default, the keys': self-attention);
  k_positions, k_segment_ids: int [B, S] when the keys are others (a decoding cache).
  impl: "reference" | "blockwise" | "auto" (= blockwise).
  """
  if n_local <= 0 or n_global < 0:
    raise ValueError(f"lm_infinite_attention needs n_local > 0 and n_global >= 0, got "
                     f"n_local={n_local}, n_global={n_global}")
  if (rotate is None) == (rotate_qk is None):
    raise ValueError("lm_infinite_attention: pass exactly one of rotate= or rotate_qk=")
  if rotate_qk is None:
    rotate_qk = lambda q, k, qp, kp: (rotate(q, qp), rotate(k, kp))
  k_positions = positions if k_positions is None else k_positions
  k_segment_ids = segment_ids if k_segment_ids is None else k_segment_ids
  length, k_length = q_BTHD.shape[1], k_BTKD.shape[1]
  if k_positions.shape[1] != k_length:
    raise ValueError(f"lm_infinite_attention: {k_length} keys but k_positions of shape "
                     f"{k_positions.shape}")
  ceiling = jnp.full_like(positions, n_local)
  q_rot, k_rot = rotate_qk(jnp.concatenate([q_BTHD, q_BTHD], axis=1),
                           jnp.concatenate([k_BTKD, k_BTKD], axis=1),
                           jnp.concatenate([positions, ceiling], axis=1),
                           jnp.concatenate([k_positions, jnp.zeros_like(k_positions)], axis=1))
  kw = dict(q_positions=positions, k_positions=k_positions, q_segment_ids=segment_ids,
            k_segment_ids=k_segment_ids, impl=impl, scale=scale)
  local = attend_with_lse(q_rot[:, :length], k_rot[:, :k_length], v_BTKD,
                          pattern=SlidingWindow(window=n_local), **kw)
  if n_global == 0:
    return local[0].astype(q_BTHD.dtype)
  glob = attend_with_lse(q_rot[:, length:], k_rot[:, k_length:], v_BTKD,
                         pattern=_LambdaGlobal(n_global, n_local), **kw)
  out, _ = merge_partials([local, glob])
  return out.astype(q_BTHD.dtype)
