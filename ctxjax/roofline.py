"""Roofline step time of a compiled train step, per chip, from its HLO costs (hlo_costs.py).

Terms (seconds per step, one chip; the SPMD program is the same on every chip):
  compute   = matmul FLOPs / peak bf16 FLOP/s
  memory    = HBM bytes / HBM bandwidth
  roofline  = sum over the instructions outside fusions of max(FLOPs / peak, bytes / bandwidth):
              within one fused kernel, compute and its HBM traffic overlap; kernels run one
              after the other (Williams et al. 2009, the roofline model, applied per kernel)
  comm      = sum over collectives of executions x payload-time on the link its group crosses:
              ring algorithms over n chips (Patarasuk & Yuan 2009; Chan et al. 2007):
              all-gather / reduce-scatter payload (n-1)/n, all-reduce 2 payload (n-1)/n,
              all-to-all payload (n-1)/n, collective-permute one hop of the payload
  step      = max(roofline, comm): XLA's TPU scheduler runs collectives asynchronously
              (all-gather/reduce-scatter/all-reduce/collective-permute start/done pairs) behind
              independent compute, so this is the fully-overlapped prediction; `serial_sec` =
              roofline + comm is the no-overlap bound. The binding term is the largest of
              compute, memory and comm. MFU = model FLOPs (6N + attention) / (chips x peak x step).

Links: a group whose chips lie in different slices crosses DCN (per-chip DCN bandwidth);
otherwise ICI, where a ring over a torus dimension drives `ring_links` links (both directions)
and a group spanning k physical dimensions (device coords) runs k such rings at once
(Austin et al. 2025, "How to Scale Your Model", part 3: all-gather over several axes).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ctxjax.hlo_costs import Collective, ProgramCosts
from ctxjax.train.topology import ChipSpec

RING_FACTOR = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
               "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
               "collective-permute": lambda n: 1.0}


@dataclasses.dataclass(frozen=True)
class MeshInfo:
  """What the roofline needs of a mesh: axis names and sizes, and per partition id (row-major
  over the mesh) its slice index and physical coords (None on CPU devices)."""
  axis_names: tuple[str, ...]
  shape: tuple[int, ...]
  slices: tuple[int, ...]
  coords: tuple | None

  @classmethod
  def from_mesh(cls, mesh) -> "MeshInfo":
    devices = list(mesh.devices.flat)
    coords = [getattr(d, "coords", None) for d in devices]
    return cls(tuple(mesh.axis_names), tuple(mesh.devices.shape),
               tuple(getattr(d, "slice_index", 0) or 0 for d in devices),
               None if any(c is None for c in coords) else tuple(tuple(c) for c in coords))


def members(c: Collective) -> list[list[int]]:
  """The chip groups of a collective; a permute's are its (source, target) pairs that move."""
  if c.kind == "collective-permute":
    return [list(p) for p in c.pairs if p[0] != p[1]]
  return c.groups


def crossed_axes(groups: list[list[int]], mesh: MeshInfo) -> tuple[str, ...]:
  """Mesh axes along which the chips of a group differ (the union over groups)."""
  crossed = set()
  for group in groups:
    pos = np.array([np.unravel_index(i, mesh.shape) for i in group])
    crossed |= {a for a, name in enumerate(mesh.axis_names) if len(set(pos[:, a])) > 1}
  return tuple(mesh.axis_names[a] for a in sorted(crossed))


def link_of(groups: list[list[int]], mesh: MeshInfo, chip: ChipSpec) -> tuple[str, float]:
  """("dcn" | "ici", bytes/s a ring over these groups gets per chip)."""
  if any(len({mesh.slices[i] for i in g}) > 1 for g in groups):
    return "dcn", chip.dcn_bandwidth
  dims = 1
  if mesh.coords is not None and groups:
    dims = max(1, max(sum(len({mesh.coords[i][d] for i in g}) > 1
                          for d in range(len(mesh.coords[0]))) for g in groups))
  return "ici", chip.ici_link_bandwidth * chip.ring_links * dims


def collective_terms(collectives: list[Collective], mesh: MeshInfo, chip: ChipSpec) -> list[dict]:
  """One row per collective: kind, axes, link, group size, bytes, executions, seconds."""
  rows = []
  for c in collectives:
    groups = members(c)
    if not groups or max(len(g) for g in groups) < 2:
      continue  # a group of one chip moves nothing
    n = max(len(g) for g in groups)
    link, bandwidth = link_of(groups, mesh, chip)
    if c.kind == "collective-permute":  # one hop: a single link, one direction
      bandwidth = chip.dcn_bandwidth if link == "dcn" else chip.ici_link_bandwidth
    seconds = c.count * c.payload_bytes * RING_FACTOR[c.kind](n) / bandwidth
    rows.append({"kind": c.kind, "name": c.name, "axes": crossed_axes(groups, mesh),
                 "link": link, "group_size": n, "payload_bytes": c.payload_bytes,
                 "count": c.count, "seconds": seconds})
  return rows


def comm_by_axes(rows: list[dict]) -> dict[str, dict]:
  """{"kind over axes (link)": {count, bytes, seconds}} summed, largest time first."""
  out = {}
  for r in rows:
    key = f"{r['kind']} over {'+'.join(r['axes'])} ({r['link']})"
    agg = out.setdefault(key, {"count": 0, "bytes": 0.0, "seconds": 0.0})
    agg["count"] += r["count"]
    agg["bytes"] += r["count"] * r["payload_bytes"]
    agg["seconds"] += r["seconds"]
  return dict(sorted(out.items(), key=lambda kv: -kv[1]["seconds"]))


def predict(costs: ProgramCosts, mesh: MeshInfo, chip: ChipSpec, model_flops: float,
            chips: int) -> dict:
  """The roofline terms, the step time, the binding term and the implied MFU (module doc)."""
  compute = costs.matmul_flops / chip.peak_flops
  memory = costs.hbm_bytes / chip.hbm_bandwidth
  roofline = sum(t * max(f / chip.peak_flops, b / chip.hbm_bandwidth) for f, b, t in costs.ops)
  rows = collective_terms(costs.collectives, mesh, chip)
  comm = sum(r["seconds"] for r in rows)
  step = max(roofline, comm)
  terms = {"compute": compute, "memory": memory, "comm": comm}
  return {"compute_sec": compute, "memory_sec": memory, "roofline_sec": roofline,
          "comm_sec": comm, "step_sec": step, "serial_sec": roofline + comm,
          "binding": max(terms, key=terms.get),
          "mfu": model_flops / (chips * chip.peak_flops * step) if step else None,
          "hlo_flops_per_chip": costs.matmul_flops, "hbm_bytes_per_chip": costs.hbm_bytes,
          "comm": comm_by_axes(rows), "loops": len(costs.loops),
          "dynamic_loops": costs.dynamic_loops, "kernel_calls": costs.kernel_calls,
          "splash_calls": costs.splash_calls}
