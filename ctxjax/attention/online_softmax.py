"""One (query block, key block) pair of flash-style attention, and merging partial attentions.

The building blocks shared by the blockwise kernel's loops (blockwise.py; Rabe & Staats 2021,
Dao et al. 2022, FlashAttention) and the ring kernel (ring.py; Liu et al. 2023). All take the
GLOBAL positions and segment ids of the blocks they are given, in the kernels' internal layout
(q: [B, K, G, Tq, D], k/v: [B, K, Tk, D], state/lse/delta: [B, K, G, Tq]; K kv heads, G query
heads per kv head):
  * `init_state`, `online_softmax_update` (fold one key block into a query block's running
    max / denominator / accumulator), `finalize_state` -> (out, lse);
  * `block_backward`: the (dq, dk, dv) contribution of one block pair given the GLOBAL lse and
    delta = rowsum(dO * O) (FlashAttention-2: dS = P * (dP - delta));
  * `merge_partials` / `combine_partials`: mix partial attentions over disjoint key sets by
    softmax over their lse (exact attention over the union, values and gradients).
Scores and softmax are float32 whatever the input dtype; masks and ALiBi follow the reference's
rule (`reference.visibility_and_alibi`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ctxjax.attention.reference import visibility_and_alibi

_F32 = jnp.float32
_NO_MAX = float(jnp.finfo(jnp.float32).min)  # running max before any visible key (finite)


def _varying(x) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def vary_like(x, *refs):
  """pcast `x` to vary over every manual (shard_map) axis that any of `refs` varies over, so
  scan / cond / while carries keep one type under shard_map(check_vma=True). No-op outside."""
  want = frozenset().union(*(_varying(r) for r in refs if r is not None))
  missing = tuple(sorted(want - _varying(x)))
  return lax.pcast(x, missing, to="varying") if missing else x


class SoftmaxState(NamedTuple):
  m: jax.Array    # float32 [B, K, G, Tq]: running max (_NO_MAX until a visible key)
  l: jax.Array    # float32 [B, K, G, Tq]: running denominator sum exp(s - m)
  acc: jax.Array  # float32 [B, K, G, Tq, D]: running sum exp(s - m) v


def init_state(q_BKGTD, *vary_refs) -> SoftmaxState:
  shape = q_BKGTD.shape[:-1]
  v = lambda x: vary_like(x, q_BKGTD, *vary_refs)
  return SoftmaxState(v(jnp.full(shape, _NO_MAX, _F32)), v(jnp.zeros(shape, _F32)),
                      v(jnp.zeros(q_BKGTD.shape, _F32)))


def _scores(q_BKGTD, k_BKSD):
  """float32 q @ k^T [B, K, G, Tq, Tk] as one 3-D batched matmul over B*K (free reshapes; XLA:CPU
  runs it ~2x faster than the 5-D einsum with unit B / G axes)."""
  b, kv, g, t, d = q_BKGTD.shape
  s = jnp.einsum("hxd,hsd->hxs", q_BKGTD.reshape(b * kv, g * t, d),
                 k_BKSD.reshape(b * kv, -1, d), preferred_element_type=_F32)
  return s.reshape(b, kv, g, t, -1)


def _weighted_values(p_BKGTS, v_BKSD):
  """float32 p @ v [B, K, G, Tq, D] as one 3-D batched matmul over B*K."""
  b, kv, g, t, s_len = p_BKGTS.shape
  out = jnp.einsum("hxs,hsd->hxd", p_BKGTS.reshape(b * kv, g * t, s_len),
                   v_BKSD.reshape(b * kv, s_len, -1), preferred_element_type=_F32)
  return out.reshape(b, kv, g, t, -1)


def block_logits(q_BKGTD, k_BKSD, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, *, pattern, scale,
                 alibi_slopes_KG=None):
  """Float32 scores [B, K, G, Tq, Tk] of one block pair; invisible pairs are -inf."""
  s = _scores(q_BKGTD, k_BKSD) * scale
  slopes = None
  if alibi_slopes_KG is not None:
    slopes = jnp.asarray(alibi_slopes_KG, _F32)[None, :, :, None, None]
  mask, bias = visibility_and_alibi(
      pattern, q_pos_BT[:, None, None, :, None], k_pos_BS[:, None, None, None, :],
      q_seg_BT[:, None, None, :, None], k_seg_BS[:, None, None, None, :], slopes)
  if bias is not None:
    s = s + bias
  return jnp.where(mask, s, -jnp.inf)


def online_softmax_update(state: SoftmaxState, q_BKGTD, k_BKSD, v_BKSD, q_pos_BT, k_pos_BS,
                          q_seg_BT, k_seg_BS, *, pattern, scale, alibi_slopes_KG=None):
  """Fold one key/value block into a query block's online-softmax state (§17)."""
  s = block_logits(q_BKGTD, k_BKSD, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, pattern=pattern,
                   scale=scale, alibi_slopes_KG=alibi_slopes_KG)
  m_new = jnp.maximum(state.m, s.max(axis=-1))  # finite: state.m starts at _NO_MAX
  p = jnp.exp(s - m_new[..., None])             # masked (-inf) -> 0
  alpha = jnp.exp(state.m - m_new)
  l_new = state.l * alpha + p.sum(axis=-1)
  pv = _weighted_values(p.astype(v_BKSD.dtype), v_BKSD)
  return SoftmaxState(m_new, l_new, state.acc * alpha[..., None] + pv)


def finalize_state(state: SoftmaxState):
  """-> (out float32 [B,K,G,T,D], lse float32 [B,K,G,T]); rows with no visible key: 0, -inf."""
  seen = state.l > 0
  out = state.acc / jnp.where(seen, state.l, 1.0)[..., None]
  lse = jnp.where(seen, state.m + jnp.log(jnp.where(seen, state.l, 1.0)), -jnp.inf)
  return out, lse


def block_backward(q_BKGTD, k_BKSD, v_BKSD, do_BKGTD, lse_BKGT, delta_BKGT, q_pos_BT, k_pos_BS,
                   q_seg_BT, k_seg_BS, *, pattern, scale, alibi_slopes_KG=None):
  """Gradient contribution of one block pair -> float32 (dq [B,K,G,Tq,D], dk, dv [B,K,Tk,D]).

  `lse` and `delta` = rowsum(dO * O) must be the GLOBAL ones (over all keys of the row);
  lse = -inf (row sees no key anywhere) is handled. Inputs are expected in float32.

  Scores are recomputed key-major, [B, K, Tk, G, Tq], so that dk = dS^T q and dv = P^T dO are
  plain row-major matmuls (measured ~15-25% faster on XLA:CPU than the query-major layout,
  which needs two transposed-lhs matmuls). `pattern.mask` is therefore called on positions
  shaped [B, 1, Tk, 1, Tq] / [B, 1, 1, 1, Tq]: patterns must be elementwise and broadcasting
  (as patterns.py requires), not assume a (Tq, Tk) trailing layout.
  """
  lse = jnp.where(jnp.isneginf(lse_BKGT), jnp.inf, lse_BKGT)  # empty row: P = 0, not NaN
  b, kv, g, t, d = q_BKGTD.shape
  s_len = k_BKSD.shape[2]
  # 3-D batched matmuls over [B*K, S or G*T, D]: free reshapes of these layouts, and XLA:CPU
  # runs them ~2x faster than the same contractions written with the unit B / G axes.
  q3, do3 = q_BKGTD.reshape(b * kv, g * t, d), do_BKGTD.reshape(b * kv, g * t, d)
  k3, v3 = k_BKSD.reshape(b * kv, s_len, d), v_BKSD.reshape(b * kv, s_len, d)
  to_st = lambda x: x.reshape(b, kv, s_len, g, t)
  mm = lambda eq, x, y: jnp.einsum(eq, x, y, preferred_element_type=_F32)
  st = to_st(mm("hsd,hxd->hsx", k3, q3)) * scale
  slopes = None
  if alibi_slopes_KG is not None:
    slopes = jnp.asarray(alibi_slopes_KG, _F32)[None, :, None, :, None]
  mask, bias = visibility_and_alibi(
      pattern, q_pos_BT[:, None, None, None, :], k_pos_BS[:, None, :, None, None],
      q_seg_BT[:, None, None, None, :], k_seg_BS[:, None, :, None, None], slopes)
  if bias is not None:
    st = st + bias  # same expression as block_logits
  st = jnp.where(mask, st, -jnp.inf)
  pt = jnp.exp(st - lse[:, :, None])  # P^T
  flat = lambda x: x.reshape(b * kv, s_len, g * t)
  dv = mm("hsx,hxd->hsd", flat(pt), do3).reshape(k_BKSD.shape)
  dpt = to_st(mm("hsd,hxd->hsx", v3, do3))
  dst = flat(pt * (dpt - delta_BKGT[:, :, None]) * scale)  # dS^T (scale folded in)
  dk = mm("hsx,hxd->hsd", dst, q3).reshape(k_BKSD.shape)
  dq = mm("hsx,hsd->hxd", dst, k3).reshape(q_BKGTD.shape)
  return dq, dk, dv


def merge_partials(partials):
  """Mix [(out [..., D], lse [...]), ...] by softmax over lse -> (out float32, lse).

  Exact attention over the union when the partials' key sets are disjoint; entries with
  lse = -inf get weight 0; if every lse is -inf: out 0, lse -inf. NaN-free gradients.
  """
  lse_N = jnp.stack([lse.astype(_F32) for _, lse in partials])
  top = lax.stop_gradient(jnp.max(lse_N, axis=0))  # a pure shift: cancels exactly
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e_N = jnp.where(jnp.isneginf(lse_N), 0.0, jnp.exp(lse_N - top[None]))
  total = e_N.sum(axis=0)
  seen = total > 0
  safe = jnp.where(seen, total, 1.0)
  out = sum((e / safe)[..., None] * o.astype(_F32) for e, (o, _) in zip(e_N, partials))
  return out, jnp.where(seen, top + jnp.log(safe), -jnp.inf)


def combine_partials(out_a, lse_a, out_b, lse_b):
  """Merge two partial attentions over disjoint key sets (any layout; lse has out's shape[:-1])."""
  out, lse = merge_partials([(out_a, lse_a), (out_b, lse_b)])
  return out.astype(out_a.dtype), lse
