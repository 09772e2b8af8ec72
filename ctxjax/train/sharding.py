"""Device mesh and logical-axis sharding from the config (MaxText/flax-lm1b style).

The mesh has four axes, always in this order:
  data     pure data parallelism (replicated parameters);
  fsdp     data parallelism with parameters and optimizer state sharded (ZeRO-3);
  context  the sequence axis of activations (context parallelism; ring/all_gather attention);
  tensor   Megatron-style tensor parallelism over heads and the MLP width.
Sizes come from `config.mesh.ici_<axis>` (within a slice) and `config.mesh.dcn_<axis>` (across
slices); one ici size may be -1, meaning "all remaining devices". The model names every
parameter and main activation with logical axes (batch, length, embed, mlp, heads, kv_heads,
head_dim, vocab, layers); `config.mesh.logical_axis_rules` maps them onto mesh axes, so the
model never changes for a new layout.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ctxjax.data.settings import coerce
from ctxjax.train.config import MeshConfig

MESH_AXES = ("data", "fsdp", "context", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def _fill(sizes: dict[str, int], total: int, where: str) -> dict[str, int]:
  """Resolve one -1 entry so the product equals `total`."""
  auto = [a for a, s in sizes.items() if s == -1]
  bad = {a: s for a, s in sizes.items() if s != -1 and (not isinstance(s, int) or s < 1)}
  if bad:
    raise ValueError(f"mesh {where} sizes must be positive integers or -1, got {bad}")
  if len(auto) > 1:
    raise ValueError(f"at most one mesh {where} size may be -1 (auto), got {auto}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if auto:
    if total % known:
      raise ValueError(f"mesh {where} sizes {sizes} do not divide the {total} devices")
    sizes = {**sizes, auto[0]: total // known}
  if math.prod(sizes.values()) != total:
    raise ValueError(f"mesh {where} sizes {sizes} multiply to {math.prod(sizes.values())}, "
                     f"but there are {total} devices")
  return sizes


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int, num_slices: int = 1):
  """(ici sizes, dcn sizes) per MESH_AXES, with -1 filled in."""
  mesh_cfg = coerce(MeshConfig, mesh_cfg, "mesh")  # a MeshConfig, or (library use) a mapping
  dcn = {a: getattr(mesh_cfg, f"dcn_{a}") for a in MESH_AXES}
  dcn = _fill(dcn, num_slices, "dcn_*")
  if num_devices % num_slices:
    raise ValueError(f"{num_devices} devices do not split into {num_slices} slices")
  ici = {a: getattr(mesh_cfg, f"ici_{a}") for a in MESH_AXES}
  ici = _fill(ici, num_devices // num_slices, "ici_*")
  return tuple(ici[a] for a in MESH_AXES), tuple(dcn[a] for a in MESH_AXES)


def create_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The 4-axis mesh; hybrid (ici x dcn) when devices span several slices."""
  devices = list(jax.devices() if devices is None else devices)
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  ici, dcn = mesh_shape(mesh_cfg, len(devices), num_slices)
  from jax.experimental import mesh_utils
  if num_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices)
    except (AssertionError, NotImplementedError, ValueError):  # fake/CPU devices: plain order
      grid = np.asarray(devices).reshape(ici)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_rules(mesh_cfg: MeshConfig) -> tuple:
  rules = coerce(MeshConfig, mesh_cfg, "mesh").logical_axis_rules or DEFAULT_RULES
  out = []
  for rule in rules:
    name, target = rule[0], rule[1]
    targets = (target,) if isinstance(target, str) or target is None else tuple(target)
    for t in targets:
      if t is not None and t not in MESH_AXES:
        raise ValueError(f"logical_axis_rules maps {name!r} to {t!r}; mesh axes are "
                         f"{list(MESH_AXES)}")
    out.append((name, target if isinstance(target, str) or target is None else tuple(target)))
  return tuple(out)


def check_params_covered(boxed_params, rules) -> None:
  """Every parameter must carry logical names, each covered by a rule: a parameter the rules
  do not know is an error naming it (it would otherwise be silently replicated)."""
  known = {name for name, _ in rules}
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    if not isinstance(leaf, nn.LogicallyPartitioned):
      raise ValueError(f"parameter {where} has no logical axis names")
    missing = [n for n in leaf.names if n is not None and n not in known]
    if missing:
      raise ValueError(f"parameter {where} uses logical axes {missing} that no "
                       f"logical_axis_rules entry maps; rules cover {sorted(known)}")


def logical_to_shardings(boxed_tree, mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves may be LogicallyPartitioned boxes (plain leaves are
  replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh, rules) -> NamedSharding:
  """[batch, length] inputs: batch over data/fsdp, length over context (per the rules)."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def check_batch_divisible(mesh, batch_size: int, seq_len: int) -> None:
  data = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % data:
    raise ValueError(f"data.batch_size={batch_size} is not divisible by data*fsdp={data} "
                     f"mesh devices")
  if seq_len % mesh.shape["context"]:
    raise ValueError(f"data.seq_len={seq_len} is not divisible by the context axis "
                     f"({mesh.shape['context']})")


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_batch_block(mesh, rules, batch_size: int, seq_len: int):
  """Which part of the global [batch, length] batch this process feeds:
  (row_shard_index, row_shard_count, column slice). Processes whose devices hold the same rows
  (a context axis spanning hosts) share a row shard and read the same rows; each then passes
  only its columns to `make_array_from_process_local_data`."""
  shard = batch_sharding(mesh, rules)
  blocks: dict[int, tuple[set, set]] = {}
  for device, (rows, cols) in shard.devices_indices_map((batch_size, seq_len)).items():
    r, c = blocks.setdefault(device.process_index, (set(), set()))
    r.add(rows.indices(batch_size)[:2])
    c.add(cols.indices(seq_len)[:2])

  def span(ranges, what):
    ordered = sorted(ranges)  # a sharding's blocks are equal or disjoint
    if any(b != a2 for (_, b), (a2, _) in zip(ordered, ordered[1:])):
      raise ValueError(f"a process's devices hold non-contiguous {what} of the batch "
                       f"{ordered}; reorder the mesh devices")
    return ordered[0][0], ordered[-1][1]

  row_spans = {p: span(r, "rows") for p, (r, _) in blocks.items()}
  starts = sorted({lo for lo, _ in row_spans.values()})
  size = row_spans[jax.process_index()][1] - row_spans[jax.process_index()][0]
  if any(hi - lo != size for lo, hi in row_spans.values()) or len(starts) * size != batch_size:
    raise ValueError(f"processes hold unequal row blocks {sorted(set(row_spans.values()))} of "
                     f"data.batch_size={batch_size}")
  lo, hi = span(blocks[jax.process_index()][1], "columns")
  return starts.index(row_spans[jax.process_index()][0]), len(starts), slice(lo, hi)
