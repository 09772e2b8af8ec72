"""Context-parallel attention: ring attention, all-gather attention, causal load balancing.

The sequence axis is sharded over a mesh axis (default "context"). Every kernel keeps the same
contract as `reference` (TECHNIQUES.md §17/§18): positions and segment ids are GLOBAL data that
travel with their tokens, so masks, ALiBi (-slope_h * (q_pos - k_pos)) and segment masking are
exact under any token layout — contiguous, zigzag or striped (see `reorder_for_context_parallel`).

Kernels (call INSIDE `jax.shard_map` over the sequence axis; local shapes q [B, Tq/n, H, D],
k/v [B, Tk/n, K, D], positions / segment ids [B, T/n]):
  * `ring_attention`: each device keeps its query shard; the K/V shard, together with its
    positions and segment ids, travels round the ring with `lax.ppermute` (n steps), in
    blockwise's blocked layout (blocked once per call). The forward is ONE online softmax over
    the ring: the local queries' blocked state (running max, denominator, float32 accumulator)
    is carried across the steps; at each step the shard in hand is folded in key block by key
    block (`blockwise.fold_and_pass_key_blocks`, only visible block pairs are computed) and each
    key block is handed to the next device once it has been used — so one key block per array
    is in flight, never a second shard, and (sent when the block pair's score temporaries are
    dead) it reuses their memory. After n steps every shard is home again, and that copy is
    the backward's residual (no second blocked copy of K/V). Gradient:
    `jax.custom_vjp`; the backward replays the ring, the float32 dK/dV accumulators travelling
    with their K/V block by block (`blockwise.backward_key_blocks(pass_block=...)`), with the
    GLOBAL lse and delta = rowsum(dO * O) (as haoliuhl/ringattention); blocks are cast to
    float32 as they are used, so bf16 K/V travel as bf16.
    Per-device memory: that of blockwise at the local length, plus the ring's travelling copy
    of the key positions and segment ids. Compiled fwd+bwd (8 heads x 64, fp32, causal,
    zigzag): ring on 8 devices at T = 16K needs 1.0004x the per-device memory of blockwise on
    one device at 2K (+25 KB); an overlapped whole-shard ring needed 1.25x
    (benchmarks/attention_ring.py).
  * `all_gather_attention`: all-gather K/V (+ positions, segment ids) over the axis, then
    blockwise attention on the local queries (MaxText's default strategy). Autodiff transposes
    the all-gather into a reduce-scatter of dK/dV. Per-device memory O(T) for K/V.

Block sizes inside a shard pair: blockwise's automatic choice (a shard with no divisor in range
is padded; padded tokens get segment ids below every real one on the axis), but a shard no
longer than 256 is cut in two so that a zigzag shard's two chunks are separate blocks
(`_auto_block`).

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
# shard_map's varying-manual-axes check (check_vma=True) needs every scan/cond/while carry typed
# as varying over the sharded axis; blockwise.py and this module pcast their zero-initialised
# carries (`vary_like`), so the wrapper runs with the check on.
BLOCKWISE_CHECKS_VMA = True


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


def _auto_block(length: int, requested):
  """Block size within one shard. None -> blockwise's automatic choice, except that a shard no
  longer than the default block is cut in two (>= 64): zigzag shards are two chunks and a
  block per chunk lets the kernel skip the invisible half of a shard pair."""
  if requested is not None:
    return requested
  if length <= bw.DEFAULT_BLOCK_Q and length % 2 == 0 and length // 2 >= 64:
    return length // 2
  return None


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

def _pad_ids(q_seg, k_seg, axis_name):
  """Segment ids for padded queries / keys: below every real id on the whole axis, so padded
  queries see no key and padded keys reach no query — also after travelling to another device."""
  base = lax.pmin(jnp.minimum(q_seg.min(), k_seg.min()), axis_name)
  return base - 1, base - 2


def _pad_to(x, n, fill):
  """Rows [B, T, ...] -> [B, n, ...], the new rows set to `fill`."""
  if n == x.shape[1]:
    return x
  return jnp.concatenate(
      [x, jnp.broadcast_to(fill, (x.shape[0], n - x.shape[1]) + x.shape[2:]).astype(x.dtype)],
      axis=1)


def _blocked_queries(q, q_pos, q_seg, k_seg, num_kv, axis_name, block_q):
  """Local query shard -> (bw.QueryBlocks, block, padding rows). A shard with no automatic block
  divisor is padded as blockwise does."""
  tq = q.shape[1]
  bq, q_pad = bw.choose_block(tq, block_q, bw.DEFAULT_BLOCK_Q, "block_q")
  if q_pad != tq:
    q_fill, _ = _pad_ids(q_seg, k_seg, axis_name)
    q, q_pos, q_seg = (_pad_to(q, q_pad, 0), _pad_to(q_pos, q_pad, q_pos[:, -1:]),
                       _pad_to(q_seg, q_pad, q_fill))
  qg = q.reshape(q.shape[:2] + (num_kv, q.shape[2] // num_kv, q.shape[3]))
  return bw.query_blocks(qg, q_pos, q_seg, bq), bq, q_pad - tq


def _blocked_keys(k, v, k_pos, q_seg, k_seg, axis_name, block_k):
  """Local K/V shard -> bw.KeyBlocks (padded like the queries, see `_pad_ids`)."""
  tk = k.shape[1]
  bk, k_pad = bw.choose_block(tk, block_k, bw.DEFAULT_BLOCK_K, "block_k")
  if k_pad != tk:
    _, k_fill = _pad_ids(q_seg, k_seg, axis_name)
    k, v = _pad_to(k, k_pad, 0), _pad_to(v, k_pad, 0)
    k_pos, k_seg = _pad_to(k_pos, k_pad, k_pos[:, -1:]), _pad_to(k_seg, k_pad, k_fill)
  return bw.key_blocks(k, v, k_pos, k_seg, bk)


def _pad_rows(x, pad):
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _slopes_KG(slopes, q, num_kv):
  return None if slopes is None else slopes.reshape(num_kv, q.shape[2] // num_kv)


def _pass_on(axis_name):
  """Send blocks to the next device on the ring (device j -> j + 1 mod n)."""
  n = _axis_size(axis_name)
  perm = [(j, (j + 1) % n) for j in range(n)]
  return lambda blocks: jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), blocks)


def _ring_fwd_pass(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale, axis_name,
                   block_q, block_k):
  """-> (out float32 [B,T,H,D], lse float32 [B,T,H] over the keys of every device,
  kb: this device's K/V shard in the blocked layout, home again after n hops).

  One online softmax over the whole ring: the blocked state of the local queries is carried
  across the n steps; at each step the K/V shard in hand is folded in key block by key block
  (`bw.fold_and_pass_key_blocks`: only visible block pairs are computed) and each key block is
  passed on to the next device as soon as it is used, so one block per array is in flight,
  never a whole shard. After the n-th step every shard is back on its owner: the backward
  starts from that copy (the residual), so XLA keeps no second blocked copy of K/V.
  """
  n = _axis_size(axis_name)
  qb, _, q_extra = _blocked_queries(q, q_pos, q_seg, k_seg, k.shape[2], axis_name, block_q)
  kb = _blocked_keys(k, v, k_pos, q_seg, k_seg, axis_name, block_k)
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=_slopes_KG(slopes, q, k.shape[2]))
  pass_block = _pass_on(axis_name)

  def step(carry, _):
    state, kb_t = carry
    return bw.fold_and_pass_key_blocks(state, qb, kb_t, pass_block=pass_block, **kw), None

  state0 = bw.init_blocked_state(qb, *kb, slopes)
  (state, kb_home), _ = lax.scan(step, (state0, kb), None, length=n)
  out, lse = bw.finalize_state(state)
  b, t, h, d = q.shape
  out = bw.q_unblocks(out).reshape(b, t + q_extra, h, d)[:, :t]
  return out, bw.stat_unblocks(lse).reshape(b, t + q_extra, h)[:, :t], kb_home


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _ring_core(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale, axis_name, block_q,
               block_k):
  out, _, _ = _ring_fwd_pass(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale,
                             axis_name, block_q, block_k)
  return out.astype(q.dtype)


def _ring_core_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale, axis_name,
                   block_q, block_k):
  out, lse, kb = _ring_fwd_pass(q, k, v, q_pos, k_pos, q_seg, k_seg, slopes, pattern, scale,
                                axis_name, block_q, block_k)
  out = out.astype(q.dtype)
  return out, (q, kb, out, lse, q_pos, k_pos, q_seg, k_seg, slopes)


def _ring_core_bwd(pattern, scale, axis_name, block_q, block_k, res, d_out):
  """Replay the ring: K/V travel as in the forward and their float32 dK/dV accumulators travel
  with them, block by block as each is done (after n hops they are back on the owning
  device); dq stays local. Each step adds the visible block pairs' gradients in place
  (`bw.backward_key_blocks`) with the GLOBAL lse and delta = rowsum(dO * O) (as
  haoliuhl/ringattention). Blocks are cast to float32 as they are used."""
  q, kb, out, lse, q_pos, k_pos, q_seg, k_seg, slopes = res
  b, t, h, d = q.shape
  tk, num_kv = k_pos.shape[1], kb.k.shape[2]
  qb, bq, q_extra = _blocked_queries(q, q_pos, q_seg, k_seg, num_kv, axis_name, block_q)
  f32 = lambda x: x.astype(_F32)
  delta = jnp.sum(f32(d_out) * f32(out), axis=-1)  # global: the same at every step
  grouped = lambda x: _pad_rows(x, q_extra).reshape((b, t + q_extra, num_kv, -1) + x.shape[3:])
  rg = bw.row_grads(grouped(f32(d_out)), grouped(f32(lse)), grouped(delta), bq)
  kw = dict(pattern=pattern, scale=scale, alibi_slopes_KG=_slopes_KG(slopes, q, num_kv))
  pass_block = _pass_on(axis_name)

  def step(carry, _):
    dq, kb_t, dk, dv = carry
    dq, dk, dv, kb_t = bw.backward_key_blocks((dq, dk, dv), qb, rg, kb_t, pass_block=pass_block,
                                              **kw)
    return (dq, kb_t, dk, dv), None

  dq0, dk0, dv0 = bw.zeros_grads(qb, kb, rg, slopes)
  (dq, _, dk, dv), _ = lax.scan(step, (dq0, kb, dk0, dv0), None,
                                length=_axis_size(axis_name))
  dq = bw.q_unblocks(dq).reshape(b, t + q_extra, h, d)[:, :t]
  dk, dv = (bw.kv_unblocks(x)[:, :tk] for x in (dk, dv))
  d_slopes = None if slopes is None else jnp.zeros_like(slopes)
  return (dq.astype(q.dtype), dk.astype(kb.k.dtype), dv.astype(kb.v.dtype), None, None, None,
          None, d_slopes)


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def ring_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, pattern,
                   alibi_slopes=None, scale=None, axis_name: str = DEFAULT_AXIS, block_q=None,
                   block_k=None):
  """Ring attention over mesh axis `axis_name`; call INSIDE shard_map (local shards).

  Same arguments as `attend` (local shards; positions / segment ids GLOBAL values), plus the
  axis and the blockwise block sizes used within one shard pair (None = automatic). Returns the
  local output shard [B, Tq/n, H, D] in q's dtype. ALiBi slopes are constants (zero cotangent).
  Works inside shard_map with check_vma=True or False.
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
