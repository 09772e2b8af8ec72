"""TPU product names (v5p-128, v5e-16, ...) -> the chip grid libtpu compiles for; per-chip specs.

Google names v4 and v5p slices by TensorCores (two per chip, fused into one "megacore" JAX
device), v5e (v5litepod) and v6e slices by chips. libtpu's topology names give the chip grid:
`v5p-128` = 64 chips = `v5p:4x4x4`. Grids follow the Cloud TPU slice shapes (as MaxText's
accelerator_to_spec_map): 3-D tori for v4/v5p — 2x2x1, 2x2x2, 2x2x4, 2x4x4, then every side a
multiple of 4, the most cubic such shape — and 2-D grids for v5e/v6e.

Per-chip HBM capacity, HBM bandwidth and peak dense bf16 FLOP/s are Google's published figures
(cloud.google.com/tpu/docs system-architecture pages for v4, v5e, v5p, v6e). ICI bandwidth per
link and direction and DCN bandwidth per chip are as tabulated by Austin et al. 2025 ("How to
Scale Your Model", part 2, "All about TPUs": v4/v5e 4.5e10, v5p/v6e 9e10 B/s one way per link;
DCN 6.25e9 B/s per v5p chip, 3.125e9 v5e, 1.25e10 v6e; v4 taken as v5p's). The GPU entry is
NVIDIA's H100 SXM datasheet (3.35 TB/s HBM3, NVLink 900 GB/s both ways = 450 one way, one
400 Gb/s InfiniBand NIC per GPU = 5e10 B/s).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re

from ctxjax.registry import Registry

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  generation: str          # v4 | v5e | v5p | v6e | h100
  hbm_bytes: int           # memory per chip (one JAX device)
  peak_flops: float        # dense bf16 FLOP/s per chip
  dims: int                # 3 = torus (v4/v5p, named by TensorCores), 2 = grid (named by chips)
  libtpu_name: str         # topology-name prefix libtpu knows
  hbm_bandwidth: float     # HBM bytes/s per chip
  ici_link_bandwidth: float  # bytes/s one way per ICI link (H100: NVLink per GPU, one way)
  ring_links: int          # links a ring over one torus dimension drives (2: both directions)
  dcn_bandwidth: float     # bytes/s per chip between slices (H100: between nodes)


CHIPS: Registry[ChipSpec] = Registry("--topology generation")
CHIPS.add("v4", ChipSpec("v4", 32 * GiB, 275e12, 3, "v4", 1.2e12, 4.5e10, 2, 6.25e9))
CHIPS.add("v5e", ChipSpec("v5e", 16 * GiB, 197e12, 2, "v5e", 8.19e11, 4.5e10, 2, 3.125e9))
CHIPS.add("v5p", ChipSpec("v5p", 95 * GiB, 459e12, 3, "v5p", 2.765e12, 9e10, 2, 6.25e9))
CHIPS.add("v6e", ChipSpec("v6e", 32 * GiB, 918e12, 2, "v6e", 1.64e12, 9e10, 2, 1.25e10))
ALIASES = {"v5litepod": "v5e"}
# 80 GB HBM3, 989 TFLOP/s dense bf16; NVSwitch: a ring sees the GPU's one-way NVLink bandwidth.
H100 = ChipSpec("h100", 80 * 10 ** 9, 989e12, 0, "", 3.35e12, 4.5e11, 1, 5e10)

# 2-D slices that exist (chips -> grid); v5e and v6e share them.
GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
            256: (16, 16)}
# 3-D slices below the 4x4x4 cube (chips -> grid); larger ones have every side a multiple of 4.
SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                # the product name as given, e.g. "v5p-128"
  chip: ChipSpec
  grid: tuple[int, ...]    # chips per side

  @property
  def num_chips(self) -> int:
    n = 1
    for side in self.grid:
      n *= side
    return n

  @property
  def libtpu_topology(self) -> str:
    return f"{self.chip.libtpu_name}:" + "x".join(str(s) for s in self.grid)

  def libtpu_kwargs(self) -> dict:
    """Extra arguments for jax.experimental.topologies.get_topology_desc."""
    if self.chip.dims == 3:
      return {"chip_config_name": "megacore"}  # one JAX device per chip (2 TensorCores)
    if self.num_chips in (1, 8):                # single-host v5e/v6e-1 and -8 (libtpu: 2x2x1)
      return {"chips_per_host_bounds": self.grid + (1,)}
    return {}


def _cube_grid(chips: int) -> tuple[int, int, int] | None:
  """The most cubic (a, b, c), a <= b <= c, every side a multiple of 4, with a*b*c = chips."""
  if chips in SMALL_3D:
    return SMALL_3D[chips]
  if chips % 64:
    return None
  blocks = chips // 64
  best = None
  for a, b in itertools.product(range(1, blocks + 1), repeat=2):
    if a > b or blocks % (a * b):
      continue
    c = blocks // (a * b)
    if c < b:
      continue
    key = (c, b)  # smallest longest side, then smallest middle side
    if best is None or key < best[0]:
      best = (key, (4 * a, 4 * b, 4 * c))
  return best[1]


def valid_names() -> list[str]:
  """Examples of every generation's product names (for error messages)."""
  out = [f"{g}-{2 * n}" for g in ("v4", "v5p") for n in list(SMALL_3D) + [64, 128, 256, 512]]
  out += [f"{g}-{n}" for g in ("v5e", "v6e") for n in GRIDS_2D]
  return out


def parse_topology(name: str) -> Topology:
  """'v5p-128' -> Topology(grid (4, 4, 4), 64 chips); unknown names -> ValueError listing
  the valid ones."""
  match = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", str(name).strip())
  hint = (f"valid names: <generation>-<size> with generation one of "
          f"{sorted(CHIPS) + sorted(ALIASES)}, e.g. {', '.join(valid_names())}")
  if not match:
    raise ValueError(f"--topology={name!r} is not a TPU product name; {hint}")
  chip = CHIPS[ALIASES.get(match.group(1), match.group(1))]
  size = int(match.group(2))
  if chip.dims == 3:
    grid = _cube_grid(size // 2) if size % 2 == 0 else None
    unit = "TensorCores (2 per chip)"
  else:
    grid = GRIDS_2D.get(size)
    unit = "chips"
  if grid is None:
    raise ValueError(f"--topology={name!r}: no {chip.generation} slice has {size} {unit}; {hint}")
  return Topology(name=str(name).strip(), chip=chip, grid=tuple(grid))


def topology_devices(topology: Topology):
  """The TPU devices of `topology` as libtpu describes them (needs `pip install libtpu`; no TPU
  attached: these devices can be compiled for, not run on)."""
  # Describing chips attaches to none, so another process holding libtpu (a training run on
  # this TPU VM, a parallel test) need not lock us out.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_topology,
                                        **topology.libtpu_kwargs())
  except Exception as err:  # noqa: BLE001  (libtpu missing, or it rejects the shape)
    raise RuntimeError(f"libtpu could not describe {topology.name} ({topology.libtpu_topology}): "
                       f"{err}. Install it with `pip install libtpu` (the version jax[tpu] pins)"
                       ) from err
  return list(desc.devices)
