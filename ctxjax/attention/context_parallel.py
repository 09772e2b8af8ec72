"""Context-parallel plumbing: the sequence axis sharded over a mesh axis (default "context").

Kernels (call INSIDE `jax.shard_map` over the sequence axis; local shapes q [B, Tq/n, H, D],
k/v [B, Tk/n, K, D], positions / segment ids [B, T/n]) keep the contract of `reference`:
positions and segment ids are GLOBAL data that travel with their tokens, so masks, ALiBi
(-slope_h * (q_pos - k_pos), Press et al. 2022) and segment masking are exact under any token
layout (layouts.py). They are registered in STRATEGIES:
  * "ring" (ring.py): K/V shards travel round the ring (Liu et al. 2023, Ring Attention);
  * "all_gather" (here): all-gather K/V (+ positions, segment ids) over the axis, then blockwise
    attention on the local queries (MaxText's default strategy). Autodiff transposes the
    all-gather into a reduce-scatter of dK/dV. Per-device memory O(T) for K/V.

`context_parallel_attend(..., mesh, axis_name, strategy, spec)` wraps a kernel in
`jax.shard_map`; `attend(..., impl="ring" | "all_gather")` (registered here) does the same with
the mesh of the current context (`jax.set_mesh(mesh)`), sharding the sequence over "context"
(ValueError if there is no such mesh axis or the lengths are not divisible by its size). On
Explicit mesh axes the inputs are resharded to the shard_map specs and the output back to q's
typed sharding (a drop-in for `reference`).

Block sizes inside a shard pair: blockwise's automatic choice, but a shard no longer than 256 is
cut in two so that a zigzag shard's two chunks are separate blocks (`auto_block`).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from ctxjax.attention import blockwise as bw
from ctxjax.attention.api import register_implementation
from ctxjax.attention.shapes import check_shapes
from ctxjax.registry import Registry

DEFAULT_AXIS = "context"
# Mesh axis names that shard attention heads by default (everything else that divides the batch
# shards the batch); an explicitly typed input sharding takes precedence (see `default_spec`).
HEAD_AXES = ("tensor", "model", "tp")
# shard_map's varying-manual-axes check (check_vma=True) needs every scan/cond/while carry typed
# as varying over the sharded axis; blockwise and ring pcast their zero-initialised carries
# (`vary_like`), so the wrapper runs with the check on.
BLOCKWISE_CHECKS_VMA = True

# name -> kernel(q, k, v, *, q_positions, ..., alibi_slopes, scale, axis_name, block_q, block_k)
STRATEGIES: Registry[Callable] = Registry("context-parallel strategy")


# ----------------------------------------------------------------------------------------------
# Helpers inside shard_map
# ----------------------------------------------------------------------------------------------

def axis_size(axis_name: str) -> int:
  """Static size of a bound mesh axis; ValueError naming the bound axes otherwise."""
  try:
    return int(lax.axis_size(axis_name))
  except (NameError, KeyError, ValueError) as err:
    mesh = jax.sharding.get_abstract_mesh()
    raise ValueError(
        f"context-parallel attention over axis {axis_name!r}, which is not bound here (mesh axes "
        f"{tuple(mesh.axis_names)}, manual {tuple(sorted(mesh.manual_axes))}); call it inside "
        f"jax.shard_map over a mesh with that axis, or use context_parallel_attend") from err


def auto_block(length: int, requested):
  """Block size within one shard. None -> blockwise's automatic choice, except that a shard no
  longer than the default block is cut in two (>= 64): zigzag shards are two chunks and a
  block per chunk lets the kernel skip the invisible half of a shard pair."""
  if requested is not None:
    return requested
  if length <= bw.DEFAULT_BLOCK_Q and length % 2 == 0 and length // 2 >= 64:
    return length // 2
  return None


def check_local(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, axis_name):
  """The shared shape check on the local shards, and the axis bound; -> its size."""
  check_shapes(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids,
               what="context-parallel attention (local shards)")
  return axis_size(axis_name)


@STRATEGIES.register("all_gather")
def all_gather_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids,
                         pattern, alibi_slopes=None, scale=None, axis_name: str = DEFAULT_AXIS,
                         block_q=None, block_k=None):
  """All-gather K/V (+ positions, segment ids) over `axis_name`, then blockwise attention of
  the local queries; call INSIDE shard_map. Same arguments and result as `ring_attention`."""
  check_local(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, axis_name)
  gather = lambda x: lax.all_gather(x, axis_name, axis=1, tiled=True)
  return bw.blockwise_attention(
      q, gather(k), gather(v), q_positions=q_positions, k_positions=gather(k_positions),
      q_segment_ids=q_segment_ids, k_segment_ids=gather(k_segment_ids), pattern=pattern,
      alibi_slopes=alibi_slopes, scale=scale, block_q=auto_block(q.shape[1], block_q),
      block_k=auto_block(k.shape[1], block_k))


# ----------------------------------------------------------------------------------------------
# shard_map wrapper and the attend registry
# ----------------------------------------------------------------------------------------------

def current_mesh():
  """The mesh of the current context (jax.set_mesh), abstract or concrete; may be empty."""
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
  strategy_kernel = STRATEGIES.get(strategy)
  mesh = current_mesh() if mesh is None else mesh
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
  kernel = functools.partial(strategy_kernel, pattern=pattern, scale=scale,
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
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
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

def _context_parallel_impl(strategy: str, what: str):
  def attend_fn(q_BTHD, k_BSKD, v_BSKD, *, q_positions, k_positions, q_segment_ids,
                k_segment_ids, pattern, alibi_slopes=None, scale=None):
    return context_parallel_attend(
        q_BTHD, k_BSKD, v_BSKD, q_positions=q_positions, k_positions=k_positions,
        q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids, pattern=pattern,
        alibi_slopes=alibi_slopes, scale=scale, strategy=strategy)
  attend_fn.__name__ = f"{strategy}_attend"
  attend_fn.__doc__ = f'`attend(..., impl="{strategy}")`: {what} over the mesh\'s "context" axis.'
  return attend_fn


ring_attend = register_implementation("ring")(
    _context_parallel_impl("ring", "ring attention"))
all_gather_attend = register_implementation("all_gather")(
    _context_parallel_impl("all_gather", "all-gather K/V"))
