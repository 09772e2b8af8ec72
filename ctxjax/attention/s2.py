"""LongLoRA shifted sparse attention, S2-Attn (Chen et al. 2024, Section 3.2).

Training-only (inference uses full attention). Tokens are cut into groups of G = group_size
(LongLoRA: G = L / 4); the first half of the heads attends causally within [kG, (k+1)G), the
second half within groups shifted by G/2.

Variants (dvlab-research/LongLoRA `llama_attn_replace.py`)
  * "flash" (default; `forward_flashattn`): the shifted half's boundaries are offset by G/2, so
    it has half-size end groups and never wraps: L 16, G 4 -> [0,1][2-5][6-9][10-13][14,15].
  * "roll" (`forward_noflashattn`): rolls the shifted half by -G/2, attends in groups of the
    rolled order (causal in rolled order) and rolls back; its last group [L-G/2..L-1, 0..G/2-1]
    lets tokens 0..G/2-1 see the tail (the leak of LongLoRA issues #15, #90). For parity only.

Design: S2 is expressed with segment ids, not a new kernel. A group is a segment: the derived
id is doc_id * n_groups + group (unique per (document, group) pair, so packed documents stay
separated), and the shifted half only changes the group index. The two head halves have
different ids, while `attend` (and every kernel behind it: reference, blockwise, ring) takes
[B, T] ids shared by all heads, so `s2_attention` calls `attend` once per head half and
concatenates the heads. The kernels stay untouched, each half gets its own exact block-skip
schedule (cost O(T * G)), and the FLOPs equal one call with per-head ids.

Groups are by token index in the row (LongLoRA's semantics) unless positions are given
(`group_by="positions"`): then by position id, so each packed document gets its own group
grid starting at its first token (as if it were unpacked), at the price of uneven groups
under jumping position ids (PoSE).
"""
from __future__ import annotations

import jax.numpy as jnp

from ctxjax.attention.api import attend
from ctxjax.attention.patterns import Causal
from ctxjax.registry import Registry

# How the shifted head half attends: name -> fn(run, q, k, v, positions, segment_ids,
# group_size, shifted_ids, slopes) -> its output; `run` is `attend` on that half.
VARIANTS = Registry("s2_attention variant")
# What groups are cut on: name -> fn(positions) -> the ids to group by (None = token index).
GROUP_BY = Registry("s2_attention group_by")
GROUP_BY.add("index", lambda positions: None)
GROUP_BY.add("positions", lambda positions: positions)


def _check_group_size(group_size):
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
    raise ValueError(f"S2-Attn group_size must be an integer >= 2, got {group_size!r}")


def _group_ids(segment_ids_BT, group_BT, n_groups):
  return segment_ids_BT * n_groups + group_BT


def shifted_group_segment_ids(segment_ids_BT, group_size: int, *, positions_BT=None):
  """Derived segment ids (plain_BT, shifted_BT) of S2-Attn's "flash" variant.

  plain: group t // G; shifted: group (t + G // 2) // G, t = token index (or position id if
  positions_BT is given). Ids are unique per (document, group); segment ids must be >= 0.
  """
  _check_group_size(group_size)
  segment_ids_BT = jnp.asarray(segment_ids_BT)
  if positions_BT is None:
    length = segment_ids_BT.shape[1]
    t_BT = jnp.broadcast_to(jnp.arange(length, dtype=segment_ids_BT.dtype), segment_ids_BT.shape)
    n_groups = length // group_size + 1
  else:
    t_BT = jnp.asarray(positions_BT).astype(segment_ids_BT.dtype)
    n_groups = (jnp.max(t_BT) + group_size // 2) // group_size + 1
  plain = _group_ids(segment_ids_BT, t_BT // group_size, n_groups)
  shifted = _group_ids(segment_ids_BT, (t_BT + group_size // 2) // group_size, n_groups)
  return plain, shifted


def s2_head_segment_ids(segment_ids_BT, group_size: int, num_heads: int, *, positions_BT=None):
  """Per-head derived ids [B, H, T]: heads [0, H/2) plain, [H/2, H) shifted (for a kernel that
  takes per-head segment ids)."""
  if num_heads % 2:
    raise ValueError(f"S2-Attn needs an even number of heads, got {num_heads}")
  plain, shifted = shifted_group_segment_ids(segment_ids_BT, group_size,
                                             positions_BT=positions_BT)
  half = num_heads // 2
  return jnp.concatenate([jnp.repeat(plain[:, None], half, 1),
                          jnp.repeat(shifted[:, None], half, 1)], axis=1)


def _kv_halves(k, num_heads):
  """kv heads read by query heads [0, H/2) and [H/2, H) (query head h reads kv h // (H/K))."""
  num_kv = k.shape[2]
  if num_kv % 2 == 0:
    return k[:, :, :num_kv // 2], k[:, :, num_kv // 2:]
  if num_kv == 1:
    return k, k
  k = jnp.repeat(k, num_heads // num_kv, axis=2)  # odd kv heads: a kv head spans both halves
  return k[:, :, :num_heads // 2], k[:, :, num_heads // 2:]


def s2_attention(q_BTHD, k_BTKD, v_BTKD, *, positions, segment_ids, group_size: int,
                 impl: str = "reference", alibi_slopes=None, variant: str = "flash",
                 group_by: str = "index", pattern=None):
  """S2-Attn self-attention -> [B, T, H, D] in q's dtype.

  q: [B, T, H, D] (H even); k, v: [B, T, K, D] (rotated by the model as usual); positions,
  segment_ids: int [B, T] (segment ids >= 0). pattern: the underlying mask (default causal).
  variant "roll" is the leaking noflash reference (parity only): index groups, causal in
  rolled token order, no ALiBi.
  """
  shifted_half = VARIANTS.get(variant)
  group_positions = GROUP_BY.get(group_by)
  _check_group_size(group_size)
  batch, length, num_heads, _ = q_BTHD.shape
  if num_heads % 2:
    raise ValueError(f"S2-Attn needs an even number of heads, got {num_heads}")
  if k_BTKD.shape[1] != length:
    raise ValueError(f"S2-Attn is self-attention: q length {length}, k length "
                     f"{k_BTKD.shape[1]}")
  if variant == "roll" and (group_by != "index" or alibi_slopes is not None):
    raise ValueError("S2-Attn variant='roll' (parity only) supports group_by='index' and no "
                     "ALiBi")
  pattern = Causal() if pattern is None else pattern
  half = num_heads // 2
  q_a, q_b = q_BTHD[:, :, :half], q_BTHD[:, :, half:]
  k_a, k_b = _kv_halves(k_BTKD, num_heads)
  v_a, v_b = _kv_halves(v_BTKD, num_heads)
  slopes_a = slopes_b = None
  if alibi_slopes is not None:
    slopes = jnp.asarray(alibi_slopes)
    slopes_a, slopes_b = slopes[:half], slopes[half:]
  plain, shifted = shifted_group_segment_ids(segment_ids, group_size,
                                             positions_BT=group_positions(positions))

  def run(q, k, v, pos, seg, slopes):
    return attend(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                  k_segment_ids=seg, pattern=pattern, alibi_slopes=slopes, impl=impl)

  out_a = run(q_a, k_a, v_a, positions, plain, slopes_a)
  out_b = shifted_half(run, q_b, k_b, v_b, positions, segment_ids, group_size, shifted, slopes_b)
  return jnp.concatenate([out_a, out_b], axis=2)


@VARIANTS.register("flash")
def _flash_half(run, q, k, v, positions, segment_ids, group_size, shifted_ids, slopes):
  """LongLoRA `forward_flashattn`: groups shifted by G/2, half-size end groups, no wrap."""
  return run(q, k, v, positions, shifted_ids, slopes)


@VARIANTS.register("roll")
def _roll_half(run, q, k, v, positions, segment_ids, group_size, shifted_ids, slopes):
  """LongLoRA `forward_noflashattn`: roll by -G/2, plain groups causal in rolled token order,
  roll back (its last group wraps round: the leak)."""
  shift = group_size // 2
  roll = lambda x: jnp.roll(x, -shift, axis=1)
  rolled_order = jnp.broadcast_to(jnp.arange(positions.shape[1], dtype=positions.dtype),
                                  positions.shape)
  rolled_ids, _ = shifted_group_segment_ids(roll(segment_ids), group_size)
  return jnp.roll(run(roll(q), roll(k), roll(v), rolled_order, rolled_ids, None), shift, axis=1)
