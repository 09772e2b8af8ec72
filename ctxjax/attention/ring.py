"""Context-parallel attention: ring attention, all-gather attention, causal load balancing.

The sequence axis is sharded over a mesh axis (default "context"). Every kernel keeps the same
contract as `reference` (TECHNIQUES.md §17/§18): positions and segment ids are GLOBAL data that
travel with their tokens, so masks, ALiBi (-slope_h * (q_pos - k_pos)) and segment masking are
exact under any token layout — contiguous, zigzag or striped (see `reorder_for_context_parallel`).

Kernels (call INSIDE `jax.shard_map` over the sequence axis; local shapes q [B, Tq/n, H, D],
k/v [B, Tk/n, K, D], positions / segment ids [B, T/n]):
  * `ring_attention`: each device keeps its query shard; the K/V shard, together with its
    positions and segment ids, travels round the ring with `lax.ppermute` (n steps). Each step
    folds one K/V shard into the local (out, lse) with `blockwise.blockwise_forward` and
    `blockwise.combine_partials`. A shard pair that the pattern / segment ids make invisible
    (decided at run time from the shards' position and segment ranges, `blockwise.visit_schedule`
    with one block per shard) is skipped with `lax.cond`; inside a visible pair the blockwise
    kernel skips invisible (block_q x block_k) pairs itself, which is where the zigzag/striped
    layouts save their half. Gradient: `jax.custom_vjp`; the forward saves (q, k, v, out, lse)
    and the backward replays the ring, rotating dK/dV accumulators together with K/V (after n
    steps they are back on their owner) and calling `blockwise.blockwise_backward` per visible
    shard pair with the GLOBAL lse and delta = rowsum(dO * O) (as haoliuhl/ringattention).
    Per-device memory is O(T/n): one query shard, K/V and dK/dV shards current + in flight
    (compiled fwd+bwd at T/n = 2048: ~1.5x single-device blockwise at T = 2048,
    benchmarks/attention_ring.py).
  * `all_gather_attention`: all-gather K/V (+ positions, segment ids) over the axis, then
    blockwise attention on the local queries (MaxText's default strategy). Autodiff transposes
    the all-gather into a reduce-scatter of dK/dV. Per-device memory O(T) for K/V.

Block sizes inside a shard pair: blockwise's automatic choice, but a shard no longer than 256
is cut in two so that a zigzag shard's two chunks are separate blocks (`_auto_block`).

Convenience: `context_parallel_attend(..., mesh, axis_name, strategy, spec)` wraps either kernel
in `jax.shard_map`; `attend(..., impl="ring" | "all_gather")` (registered when this module is
imported) does the same with the mesh of the current context (`jax.set_mesh(mesh)`), sharding
the sequence over "context" (ValueError if there is no such mesh axis or the lengths are not
divisible by its size). On Explicit mesh axes the inputs are resharded to the shard_map specs
and the output back to q's typed sharding (a drop-in for `reference`).

Load balancing (applied ONCE at data load to tokens, targets, positions and segment ids — every
other op is position-wise — and undone on outputs with `restore_from_context_parallel`):
  * "contiguous": device i gets tokens [i*T/n, (i+1)*T/n);
  * "zigzag" (dual-chunk swap): 2n chunks, device i gets chunks i and 2n-1-i;
  * "striped": device i gets tokens t = i (mod n).
T 16, n 4 causal (q, k) pairs per device: contiguous 10/26/42/58, zigzag 34 each, striped
28/32/36/40 (`causal_pair_counts`).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from ctxjax.attention import blockwise as bw
from ctxjax.attention.api import register_implementation

DEFAULT_AXIS = "context"
STRATEGIES = ("ring", "all_gather")
LAYOUTS = ("contiguous", "zigzag", "striped")
# Mesh axis names that shard attention heads by default (everything else that divides the batch
# shards the batch); an explicitly typed input sharding takes precedence (see `default_spec`).
HEAD_AXES = ("tensor", "model", "tp")

_F32 = jnp.float32
# shard_map's varying-manual-axes check (check_vma=True) needs every scan/cond carry typed as
# varying over the sharded axis. This module's own carries are (`_vary_like`); blockwise.py's
# internal ones are only once it pcasts its zero-initialised carries (it then exposes
# `vary_like`). Until then the wrapper runs with check_vma=False, and a caller that invokes
# `ring_attention` / `all_gather_attention` inside its own shard_map must do the same.
BLOCKWISE_CHECKS_VMA = hasattr(bw, "vary_like")


# ----------------------------------------------------------------------------------------------
# Load balancing: token layouts (pure numpy index vectors)
# ----------------------------------------------------------------------------------------------

def _check_layout(length: int, num_shards: int, strategy: str) -> None:
  if strategy not in LAYOUTS:
    raise ValueError(f"context-parallel layout strategy={strategy!r}; valid choices: "
                     f"{list(LAYOUTS)}")
  if num_shards <= 0:
    raise ValueError(f"context-parallel num_shards={num_shards} must be > 0")
  chunks = 2 * num_shards if strategy == "zigzag" else num_shards
  if length % chunks:
    raise ValueError(f"context-parallel layout {strategy!r}: sequence length {length} is not "
                     f"divisible by {chunks} (= {'2 x ' if strategy == 'zigzag' else ''}"
                     f"num_shards {num_shards})")


def context_parallel_permutation(length: int, num_shards: int, strategy: str) -> np.ndarray:
  """int [length]: `reordered = x[perm]`; device i holds reordered[i*T/n:(i+1)*T/n]."""
  _check_layout(length, num_shards, strategy)
  t = np.arange(length)
  if strategy == "contiguous":
    return t
  if strategy == "striped":  # device i: tokens i, i+n, i+2n, ...
    return t.reshape(length // num_shards, num_shards).T.reshape(-1)
  chunks = t.reshape(2 * num_shards, length // (2 * num_shards))  # zigzag
  order = np.stack([np.arange(num_shards), 2 * num_shards - 1 - np.arange(num_shards)], 1)
  return chunks[order.reshape(-1)].reshape(-1)


def device_tokens(length: int, num_shards: int, strategy: str) -> np.ndarray:
  """int [num_shards, length / num_shards]: the original token indices each device holds."""
  return context_parallel_permutation(length, num_shards, strategy).reshape(num_shards, -1)


def _take(x, idx, axis):
  if isinstance(x, np.ndarray):
    return np.take(x, idx, axis=axis)
  x = jnp.asarray(x)
  axis = axis % x.ndim
  index = (slice(None),) * axis + (np.asarray(idx, np.int32),)
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = tuple(getattr(sharding, "spec", ()) or ())
  if any(e is not None for e in spec):  # explicitly sharded: keep the layout's sharding
    return x.at[index].get(out_sharding=sharding)
  return x[index]


def reorder_for_context_parallel(x, axis: int, num_shards: int, strategy: str):
  """Permute `x` along `axis` into the layout `strategy` (numpy in -> numpy out, else jax).

  Apply once at data load to every per-token array (tokens, targets, positions, segment ids,
  loss masks); then shard `axis` contiguously over the context axis.
  """
  perm = context_parallel_permutation(x.shape[axis], num_shards, strategy)
  return _take(x, perm, axis)


def restore_from_context_parallel(x, axis: int, num_shards: int, strategy: str):
  """Inverse of `reorder_for_context_parallel`: back to the natural token order."""
  perm = context_parallel_permutation(x.shape[axis], num_shards, strategy)
  return _take(x, np.argsort(perm), axis)


def causal_pair_matrix(length: int, num_shards: int, strategy: str) -> np.ndarray:
  """int [n, n]: causal (q, k) pairs (k <= q) between the queries of device i and the keys of
  device j for a single unpacked sequence of `length` tokens."""
  tok = device_tokens(length, num_shards, strategy)
  return (tok[None, :, None, :] <= tok[:, None, :, None]).sum((-1, -2))


def causal_pair_counts(length: int, num_shards: int, strategy: str) -> np.ndarray:
  """int [n]: causal (q, k) pairs whose query lives on each device (the attention work)."""
  return causal_pair_matrix(length, num_shards, strategy).sum(1)


# ----------------------------------------------------------------------------------------------
# Helpers inside shard_map
# ----------------------------------------------------------------------------------------------

def _axis_size(axis_name: str) -> int:
  """Static size of a bound mesh axis; ValueError naming the bound axes otherwise."""
  try:
    return int(lax.axis_size(axis_name))
  except (NameError, KeyError, ValueError) as err:
    mesh = jax.sharding.get_abstract_mesh()
    raise ValueError(
        f"context-parallel attention over axis {axis_name!r}, which is not bound here (mesh axes "
        f"{tuple(mesh.axis_names)}, manual {tuple(sorted(mesh.manual_axes))}); call it inside "
        f"jax.shard_map over a mesh with that axis, or use context_parallel_attend") from err


def _varying(x) -> frozenset:
  """Manual mesh axes over which `x` varies (jax 0.10: aval.manual_axis_type.varying)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))  # older jax


def _vary_like(x, *refs):
  """pcast `x` to varying over every manual axis any of `refs` varies over (scan/cond carries
  must keep one type under shard_map's check_vma)."""
  want = frozenset().union(*(_varying(r) for r in refs if r is not None))
  missing = tuple(sorted(want - _varying(x)))
  return lax.pcast(x, missing, to="varying") if missing else x


def _auto_block(length: int, requested):
  """Block size within one shard. None -> blockwise's automatic choice, except that a shard no
  longer than the default block is cut in two (>= 64): zigzag shards are two chunks and a
  block per chunk lets the kernel skip the invisible half of a shard pair."""
  if requested is not None:
    return requested
  if length <= bw.DEFAULT_BLOCK_Q and length % 2 == 0 and length // 2 >= 64:
    return length // 2
  return None


def _shard_visible(q_pos, k_pos, q_seg, k_seg, pattern):
  """Scalar bool: may any (q, k) pair of these two whole shards be visible?"""
  return bw.visit_schedule(q_pos, k_pos, q_seg, k_seg, pattern=pattern,
                           block_q=q_pos.shape[1], block_k=k_pos.shape[1])[0, 0]


def _check_local(q, k, q_pos, k_pos, q_seg, k_seg):
  b, tq, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
    raise ValueError(f"context-parallel attention shapes do not match: q {q.shape}, "
                     f"k {k.shape}")
  for name, arr, want in (("q_positions", q_pos, (b, tq)), ("q_segment_ids", q_seg, (b, tq)),
                          ("k_positions", k_pos, (b, k.shape[1])),
                          ("k_segment_ids", k_seg, (b, k.shape[1]))):
    if arr.shape != want:
      raise ValueError(f"context-parallel attention: local {name} has shape {arr.shape}, "
                       f"want {want}")


# ----------------------------------------------------------------------------------------------
# Ring attention (custom_vjp)
# ----------------------------------------------------------------------------------------------

def _ring_fwd_pass(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale, axis_name,
                   block_q, block_k):
  """-> out float32 [B,T,H,D], lse float32 [B,T,H] over the keys of every device."""
  n = _axis_size(axis_name)
  perm = [(j, (j + 1) % n) for j in range(n)]
  kw = dict(pattern=pattern, alibi_slopes=slopes, scale=scale, block_q=block_q,
            block_k=block_k)
  refs = (q, k, v, q_pos, k_pos, q_seg, k_seg, slopes)
  out0 = _vary_like(jnp.zeros(q.shape, _F32), *refs)
  lse0 = _vary_like(jnp.full(q.shape[:-1], -jnp.inf, _F32), *refs)

  def step(carry, _):
    out, lse, kv = carry
    # Send the current shard on before computing with it (lets XLA overlap the transfer).
    nxt = tuple(lax.ppermute(x, axis_name, perm) for x in kv)
    k_t, v_t, kp_t, ks_t = kv

    def visit(o_l):
      o_t, l_t = bw.blockwise_forward(q, k_t, v_t, q_positions=q_pos, k_positions=kp_t,
                                      q_segment_ids=q_seg, k_segment_ids=ks_t, **kw)
      return bw.combine_partials(o_l[0], o_l[1], o_t, l_t)

    out, lse = lax.cond(_shard_visible(q_pos, kp_t, q_seg, ks_t, pattern), visit,
                        lambda o_l: o_l, (out, lse))
    return (out, lse, nxt), None

  (out, lse, _), _ = lax.scan(step, (out0, lse0, (k, v, k_pos, k_seg)), None, length=n)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _ring_core(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale, axis_name, block_q,
               block_k):
  out, _ = _ring_fwd_pass(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale,
                          axis_name, block_q, block_k)
  return out.astype(q.dtype)


def _ring_core_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale, axis_name,
                   block_q, block_k):
  out, lse = _ring_fwd_pass(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale,
                            axis_name, block_q, block_k)
  out = out.astype(q.dtype)
  return out, (q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, slopes)


def _ring_core_bwd(pattern, scale, axis_name, block_q, block_k, res, d_out):
  q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg, slopes = res
  n = _axis_size(axis_name)
  perm = [(j, (j + 1) % n) for j in range(n)]
  kw = dict(pattern=pattern, alibi_slopes=slopes, scale=scale, block_q=block_q,
            block_k=block_k)
  delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)  # global: same every step
  refs = (q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, d_out, lse)
  dq0 = _vary_like(jnp.zeros(q.shape, _F32), *refs)
  dkv0 = _vary_like(jnp.zeros(k.shape, _F32), *refs)

  def step(carry, _):
    dq, kv, dk, dv = carry
    nxt = tuple(lax.ppermute(x, axis_name, perm) for x in kv)
    k_t, v_t, kp_t, ks_t = kv

    def visit(acc):
      dq_t, dk_t, dv_t = bw.blockwise_backward(
          q, k_t, v_t, out, lse, d_out, q_positions=q_pos, k_positions=kp_t, q_segment_ids=q_seg,
          k_segment_ids=ks_t, delta_BTH=delta, **kw)
      return acc[0] + dq_t, acc[1] + dk_t, acc[2] + dv_t

    dq, dk, dv = lax.cond(_shard_visible(q_pos, kp_t, q_seg, ks_t, pattern), visit,
                          lambda acc: acc, (dq, dk, dv))
    # dK/dV travel with their K/V; after n hops they are back on the owning device.
    dk, dv = (lax.ppermute(x, axis_name, perm) for x in (dk, dv))
    return (dq, nxt, dk, dv), None

  (dq, _, dk, dv), _ = lax.scan(step, (dq0, (k, v, k_pos, k_seg), dkv0, dkv0), None, length=n)
  d_slopes = None if slopes is None else jnp.zeros_like(slopes)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None,
          d_slopes)


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def ring_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                   alibi_slopes=None, scale=None, axis_name: str = DEFAULT_AXIS, block_q=None,
                   block_k=None):
  """Ring attention over mesh axis `axis_name`; call INSIDE shard_map (local shards).

  Same arguments as `attend` (local shards; positions / segment ids GLOBAL values), plus the
  axis and the blockwise block sizes used within one shard pair (None = automatic). Returns the
  local output shard [B, Tq/n, H, D] in q's dtype. ALiBi slopes are constants (zero cotangent).
  The enclosing shard_map needs check_vma=False unless BLOCKWISE_CHECKS_VMA (see above).
  """
  _check_local(q, k, q_positions, k_positions, q_segment_ids, k_segment_ids)
  _axis_size(axis_name)
  head_dim = q.shape[-1]
  scale = head_dim ** -0.5 if scale is None else float(scale)
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, _F32)
  return _ring_core(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, slopes,
                    pattern, scale, axis_name, _auto_block(q.shape[1], block_q),
                    _auto_block(k.shape[1], block_k))


def all_gather_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids,
                         pattern, alibi_slopes=None, scale=None, axis_name: str = DEFAULT_AXIS,
                         block_q=None, block_k=None):
  """All-gather K/V (+ positions, segment ids) over `axis_name`, then blockwise attention of
  the local queries; call INSIDE shard_map. Same arguments and result as `ring_attention`."""
  _check_local(q, k, q_positions, k_positions, q_segment_ids, k_segment_ids)
  _axis_size(axis_name)
  gather = lambda x: lax.all_gather(x, axis_name, axis=1, tiled=True)
  return bw.blockwise_attention(
      q, gather(k), gather(v), q_positions=q_positions, k_positions=gather(k_positions),
      q_segment_ids=q_segment_ids, k_segment_ids=gather(k_segment_ids), pattern=pattern,
      alibi_slopes=alibi_slopes, scale=scale, block_q=_auto_block(q.shape[1], block_q),
      block_k=_auto_block(k.shape[1], block_k))


_KERNELS = {"ring": ring_attention, "all_gather": all_gather_attention}


# ----------------------------------------------------------------------------------------------
# shard_map wrapper and the attend registry
# ----------------------------------------------------------------------------------------------

def _current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    try:
      concrete = jax.sharding.get_mesh()
    except Exception:  # pragma: no cover - API differences
      concrete = None
    if concrete is not None and not concrete.empty:
      return concrete
  return mesh


def _entries(e):
  return () if e is None else ((e,) if isinstance(e, str) else tuple(e))


def _spec_or_none(axes: Sequence[str]):
  axes = tuple(axes)
  return None if not axes else (axes[0] if len(axes) == 1 else axes)


def default_spec(mesh, q_shape, k_shape, axis_name: str = DEFAULT_AXIS, q=None) -> P:
  """PartitionSpec for q/k/v [batch, len, heads, head_dim] with the sequence over `axis_name`.

  An explicitly typed sharding of `q` (Explicit mesh axes) is kept for batch and heads.
  Otherwise heads are sharded over the mesh axes in HEAD_AXES whose product divides both the
  query and kv head counts, the batch over the remaining axes whose product divides it; any
  axis that does not divide stays replicated.
  """
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  explicit = None
  if q is not None:
    try:
      sharding = jax.typeof(q).sharding
      explicit = tuple(sharding.spec) if sharding is not None else None
    except Exception:  # pragma: no cover - no typed sharding
      explicit = None
  if explicit and any(e is not None for e in explicit):
    explicit = explicit + (None,) * (4 - len(explicit))
    batch = _entries(explicit[0])
    heads = _entries(explicit[2])
    if axis_name in batch + heads:
      raise ValueError(f"context-parallel attention: q is sharded over {axis_name!r} outside "
                       f"the sequence dimension (spec {explicit})")
    return P(_spec_or_none(batch), axis_name, _spec_or_none(heads), None)

  def pick(candidates, dims):
    chosen, prod = [], 1
    for a in candidates:
      if all(dim % (prod * sizes[a]) == 0 for dim in dims):
        chosen.append(a)
        prod *= sizes[a]
    return chosen

  others = [a for a in mesh.axis_names if a != axis_name and sizes[a] > 1]
  heads = pick([a for a in others if a in HEAD_AXES], (q_shape[2], k_shape[2]))
  batch = pick([a for a in others if a not in heads], (q_shape[0],))
  return P(_spec_or_none(batch), axis_name, _spec_or_none(heads), None)


def context_parallel_attend(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids,
                            pattern, alibi_slopes=None, scale=None, mesh=None,
                            axis_name: str = DEFAULT_AXIS, strategy: str = "ring", spec=None,
                            block_q=None, block_k=None):
  """Context-parallel attention on GLOBAL arrays: shard_map over `mesh` (None = the current
  mesh, `jax.set_mesh`), sequence sharded over `axis_name`, strategy "ring" | "all_gather".

  spec: PartitionSpec of q/k/v [batch, len, heads, head_dim]; its `len` entry must be
  `axis_name` (None = `default_spec`). Positions / segment ids follow (batch, len); ALiBi
  slopes follow the heads entry. Inputs must already be in the desired layout (see
  `reorder_for_context_parallel`); the output is in the same layout.
  """
  if strategy not in _KERNELS:
    raise ValueError(f"context-parallel strategy={strategy!r}; valid choices: "
                     f"{sorted(_KERNELS)}")
  mesh = _current_mesh() if mesh is None else mesh
  names = tuple(getattr(mesh, "axis_names", ()) or ())
  if mesh is None or getattr(mesh, "empty", False) or axis_name not in names:
    raise ValueError(f"context-parallel attention ({strategy}) needs mesh axis {axis_name!r}, "
                     f"but the mesh axes are {names} (set one with jax.set_mesh(mesh) or "
                     f"pass mesh=)")
  n = dict(zip(names, mesh.axis_sizes))[axis_name]
  b, tq, h, d = q.shape
  tk, kh = k.shape[1], k.shape[2]
  if tq % n or tk % n:
    raise ValueError(f"context-parallel attention: query length {tq} and key length {tk} must "
                     f"be divisible by the size {n} of mesh axis {axis_name!r}")
  kernel = functools.partial(_KERNELS[strategy], pattern=pattern, scale=scale,
                             axis_name=axis_name, block_q=block_q, block_k=block_k)
  args = dict(q_positions=q_positions, k_positions=k_positions, q_segment_ids=q_segment_ids,
              k_segment_ids=k_segment_ids)
  if axis_name in getattr(mesh, "manual_axes", ()):  # already inside shard_map over the axis
    return kernel(q, k, v, alibi_slopes=alibi_slopes, **args)

  spec = default_spec(mesh, q.shape, k.shape, axis_name, q=q) if spec is None else P(*spec)
  spec = P(*(tuple(spec) + (None,) * (4 - len(spec))))
  if spec[1] != axis_name:
    raise ValueError(f"context-parallel attention: spec {spec} must shard the sequence "
                     f"(dimension 1) over {axis_name!r}")
  row_spec = P(spec[0], spec[1])
  head_spec = P(spec[2])

  def local(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes):
    return kernel(q, k, v, q_positions=q_pos, k_positions=k_pos, q_segment_ids=q_seg,
                  k_segment_ids=k_seg, alibi_slopes=slopes)

  in_specs = (spec, spec, spec, row_spec, row_spec, row_spec, row_spec,
              None if alibi_slopes is None else head_spec)
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec,
                     check_vma=BLOCKWISE_CHECKS_VMA)
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, _F32)
  args = (q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, slopes)
  if not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return fn(*args)
  # Explicit axes: shard_map wants inputs typed with its in_specs; the output goes back to q's
  # typed sharding, so the registry kernels are drop-in replacements for `reference`.
  to = ((lambda s: jax.sharding.NamedSharding(mesh, s)) if isinstance(mesh, jax.sharding.Mesh)
        else (lambda s: s))
  q_sharding = getattr(jax.typeof(q), "sharding", None)
  args = tuple(None if a is None else jax.reshard(a, to(s)) for a, s in zip(args, in_specs))
  out = fn(*args)
  if q_sharding is not None and not getattr(q_sharding.mesh, "empty", True):
    out = jax.reshard(out, q_sharding if isinstance(mesh, jax.sharding.Mesh) else
                      q_sharding.spec)
  return out


@register_implementation("ring")
def ring_attend(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids,
                k_segment_ids, pattern, alibi_slopes=None, scale=None):
  """`attend(..., impl="ring")`: ring attention over the current mesh's "context" axis."""
  return context_parallel_attend(
      q_BTHD, k_BSKD, v_BSKD, q_positions=q_positions, k_positions=k_positions,
      q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, pattern=pattern,
      alibi_slopes=alibi_slopes, scale=scale, strategy="ring")


@register_implementation("all_gather")
def all_gather_attend(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids,
                      k_segment_ids, pattern, alibi_slopes=None, scale=None):
  """`attend(..., impl="all_gather")`: all-gather K/V over the current mesh's "context" axis."""
  return context_parallel_attend(
      q_BTHD, k_BSKD, v_BSKD, q_positions=q_positions, k_positions=k_positions,
      q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, pattern=pattern,
      alibi_slopes=alibi_slopes, scale=scale, strategy="all_gather")
