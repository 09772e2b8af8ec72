"""Per-device costs of a compiled XLA program, read from its post-optimisation HLO text.

`compiled.cost_analysis()` counts a while loop's body once, so a program with scanned layers,
a ring's scan or gradient accumulation is undercounted by the trip counts. `program_costs`
walks the HLO computations from ENTRY instead, multiplying each loop body by its trip count
(the `known_trip_count` backend config XLA attaches, else the constant its condition compares
the induction variable with). A loop with a data-dependent trip count (blockwise attention's
visit lists, ctxjax/attention/blockwise.py) is counted at its enclosing loop's trip count n:
on the square block grid of one device's shard that is every block pair visible, the busiest
ring device's count each step; `causal_visits` counts (n + 1) / 2, the causal pairs a device
visits over its own whole sequence. It returns:

- matmul FLOPs: 2 x output elements x contracted size for every `dot`, and the valid
  multiply-adds of every `convolution` (the TPU compiler rewrites many dots as convolutions),
  inside fusions too;
- HBM bytes: operand + result bytes of every instruction that runs outside a fusion (a
  fusion's internals stay on chip), skipping bookkeeping ops and arrays the layout places in
  another memory space (`S(n)`: TPU VMEM / semaphores); an operand read only through slices
  (dynamic-slice, gather) counts the slices, an in-place update (dynamic-update-slice,
  scatter: a loop's `put_blocks`) the update, not the whole buffer;
- collectives: kind, payload bytes, replica groups (explicit, iota `[G,S]<=[..]T(..)`, or the
  `mesh[...] {axes}` form, read by ctxjax/hlo_text.py) or permute pairs, and how many times
  each runs.

Partition ids in the groups are positions in the compiled device assignment (row-major over
the mesh for a program jitted over it); ctxjax/roofline.py maps them to mesh axes.
"""
from __future__ import annotations

import dataclasses
import math
import re

from ctxjax.hlo_text import (DTYPE_BYTES, Instr, arrays, attr, called, dims_of, parse_module,
                             replica_groups, shape_bytes, trip_count)

COLLECTIVES = {"all-gather": "all-gather", "all-gather-start": "all-gather",
               "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
               "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all",
               "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
               "collective-permute-start": "collective-permute"}
# No HBM traffic of their own: aliases, control flow (its bodies are walked), async halves.
NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
              "conditional", "partition-id", "replica-id", "after-all", "opt-barrier",
              "iota", "copy-done", "all-gather-done", "all-reduce-done",
              "collective-permute-done", "async-done", "slice-done", "async-update", "send-done",
              "recv-done", "add-dependency", "domain", "custom-call"}

# Ops that read only the part of operand 0 they output, and ops that write an update into
# operand 0 in place (its other elements are neither read nor written).
SLICE_READS = {"dynamic-slice", "gather", "slice"}
IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}   # opcode -> index of the update operand

@dataclasses.dataclass
class Collective:
  kind: str                  # all-gather | all-reduce | reduce-scatter | all-to-all | collective-permute
  name: str
  payload_bytes: float       # gathered result / scattered input / reduced or sent buffer
  groups: list[list[int]]    # partition ids per group ([] = unknown)
  pairs: list[tuple[int, int]]  # collective-permute source -> target
  count: float               # executions per step (loop trip counts multiplied)


@dataclasses.dataclass
class ProgramCosts:
  matmul_flops: float = 0.0
  hbm_bytes: float = 0.0
  collectives: list[Collective] = dataclasses.field(default_factory=list)
  ops: list[tuple[float, float, int]] = dataclasses.field(default_factory=list)
  # ^ (matmul FLOPs, HBM bytes, executions) of every instruction that runs outside a fusion
  loops: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (while, trip count)
  dynamic_loops: int = 0     # data-dependent trip counts, taken as the enclosing loop's
  kernel_calls: float = 0.0  # executions of Mosaic (Pallas) kernels with no cost model here
  splash_calls: float = 0.0  # executions of splash attention's kernels, costed by `splash_cost`


# Splash attention's Mosaic kernels (jax.experimental.pallas.ops.tpu.splash_attention) carry no
# cost in the HLO. Each computes T x S x D matmuls per query head over its visible blocks:
# forward S = QK^T and O = PV; the dq kernel recomputes S, then dP = dO V^T and dQ = dS K; the
# dkv kernel recomputes S and dP, then dV = P^T dO and dK = dS^T Q (no fused backward).
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH_NAME = re.compile(r"splash_m[qh]a_(fwd|dq|dkv)_")


def splash_cost(instr: Instr, shapes: dict[str, str], density: float,
                attention: tuple[int, int] | None) -> tuple[float, float] | None:
  """(matmul FLOPs, HBM bytes) of one splash kernel call, or None if `instr` is not one or
  `attention` = (T, head_dim) is unknown. The queries are its largest operand or result shaped
  [..., T, head_dim] (self-attention: S = T; XLA may drop unit dimensions); `density` is the
  fraction of block pairs its mask keeps (causal ~ (n + 1) / 2n). Bytes: its operands and
  results, each moved once (the scores stay in VMEM)."""
  kind = _SPLASH_NAME.search(instr.name)
  if kind is None or attention is None:
    return None
  candidates = [dims for _, dims, _ in arrays(instr.shape)]
  candidates += [dims_of(shapes[o]) for o in instr.operands if o in shapes]
  queries = [d for d in candidates if tuple(d[-2:]) == tuple(attention)]
  if not queries:
    return None
  length, head_dim = attention
  rows = max(math.prod(d[:-2]) for d in queries)   # query heads x rows on this device
  flops = 2.0 * SPLASH_MATMULS[kind.group(1)] * rows * length * length * head_dim
  hbm = shape_bytes(instr.shape, True) + sum(shape_bytes(shapes[o], True) for o in instr.operands
                                             if o in shapes)
  return flops * density, hbm


def dot_flops(instr: Instr, shapes: dict[str, str]) -> float:
  lhs = dims_of(shapes[instr.operands[0]])
  contract = [int(d) for d in (attr(instr.attrs, "lhs_contracting_dims") or "{}").strip("{}")
              .split(",") if d]
  return 2.0 * math.prod(dims_of(instr.shape)) * math.prod(lhs[d] for d in contract)


def _valid_taps(size: int, out: int, window: int, stride: int, pad_lo: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
  """(output position, window tap) pairs of one spatial dim that land on a real input element."""
  dilated = (size - 1) * lhs_dilate + 1
  total = 0
  for tap in range(window):
    offset = tap * rhs_dilate - pad_lo
    if lhs_dilate == 1:  # 0 <= o * stride + offset < dilated
      lo = max(0, -(offset // stride))  # ceil(-offset / stride)
      hi = min(out - 1, (dilated - 1 - offset) // stride)
      total += max(0, hi - lo + 1)
    else:
      total += sum(1 for o in range(out) if 0 <= o * stride + offset < dilated
                   and (o * stride + offset) % lhs_dilate == 0)
  return total


def conv_flops(instr: Instr, shapes: dict[str, str]) -> float:
  """2 x the multiply-adds that touch real (unpadded) inputs."""
  labels = attr(instr.attrs, "dim_labels")
  lhs_l, rest = labels.split("_")
  rhs_l, out_l = rest.split("->")
  lhs, rhs, out = (dims_of(shapes[instr.operands[0]]), dims_of(shapes[instr.operands[1]]),
                   dims_of(instr.shape))
  window = {}
  for item in (attr(instr.attrs, "window") or "{}").strip("{}").split():
    key, value = item.split("=")
    window[key] = value.split("x")
  spatial = sorted((c for c in lhs_l if c.isdigit()), key=int)  # window lists dims 0, 1, ..
  macs = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")]
  for k, dim in enumerate(spatial):
    get = lambda key, default: int(window[key][k]) if key in window else default
    pad_lo = int(window["pad"][k].split("_")[0]) if "pad" in window else 0
    macs *= _valid_taps(lhs[lhs_l.index(dim)], out[out_l.index(dim)],
                        rhs[rhs_l.index(dim)], get("stride", 1), pad_lo, get("lhs_dilate", 1),
                        get("rhs_dilate", 1))
  return 2.0 * macs


def _payload(instr: Instr, kind: str, shapes: dict[str, str]) -> float:
  operand = sum(shape_bytes(shapes[o]) for o in instr.operands if o in shapes)
  if kind == "all-gather":  # the gathered result (the -start op's tuple holds the input too)
    return max(DTYPE_BYTES[t] * math.prod(d) for t, d, _ in arrays(instr.shape))
  if kind == "reduce-scatter":
    return operand
  if instr.opcode.endswith("-start"):
    return operand
  return shape_bytes(instr.shape)


def _param_read(body: list[Instr], k: int, comps: dict[str, list[Instr]]) -> float | None:
  """Bytes a fused computation reads of its parameter k when it reads it only through slices
  (or writes an update into it in place), looking through bitcasts and nested fusions; None
  when some use reads it whole."""
  name = next((i.name for i in body if i.opcode == "parameter" and i.operands == [str(k)]), None)
  if name is None:
    return None
  total, frontier = 0.0, [name]
  while frontier:
    current = frontier.pop()
    for user in body:
      for pos, operand in enumerate(user.operands):
        if operand != current:
          continue
        if user.opcode in SLICE_READS and pos == 0:
          total += shape_bytes(user.shape)
        elif user.opcode in IN_PLACE and pos == 0:
          pass
        elif user.opcode in ("bitcast", "reshape"):
          frontier.append(user.name)
        elif user.opcode == "fusion":
          inner = _param_read(comps.get(called(user.attrs, "calls")[0], []), pos, comps)
          if inner is None:
            return None
          total += inner
        else:
          return None
  return total


def _traffic(instr: Instr, shapes: dict[str, str], body: list[Instr] | None,
             comps: dict[str, list[Instr]]) -> float:
  """HBM bytes an instruction outside fusions moves: its operands and result, except the
  parts of an operand that a slice never reads and the parts of an in-place buffer that an
  update never touches (a fusion is looked into: `body` is its fused computation)."""
  def size(name):
    return shape_bytes(shapes[name], True) if name in shapes else 0.0

  if body is None:  # a lone op
    if instr.opcode in SLICE_READS:  # reads at most what it outputs (a gather may repeat rows)
      return shape_bytes(instr.shape, True) + min(shape_bytes(instr.shape),
                                                  size(instr.operands[0]))
    if instr.opcode in ("slice-start", "copy-start"):  # (source, destination, context) tuple
      leaves = arrays(instr.shape)
      dest = leaves[1] if instr.opcode == "slice-start" else leaves[0]
      moved = DTYPE_BYTES[dest[0]] * math.prod(dest[1])
      return min(moved, size(instr.operands[0])) + (0 if dest[2] else moved)
    if instr.opcode in IN_PLACE:
      return 2 * size(instr.operands[IN_PLACE[instr.opcode]])
    return shape_bytes(instr.shape, True) + sum(size(o) for o in instr.operands)
  total = 0.0
  for k, operand in enumerate(instr.operands):
    read = _param_read(body, k, comps)
    total += size(operand) if read is None else min(size(operand), read)
  by_name = {i.name: i for i in body}
  root = next((i for i in body if i.root), body[-1])
  outputs = [by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
  leaves = arrays(instr.shape)  # the fusion's own result layouts say which memory space
  for out, (dtype, dims, space) in zip(outputs, leaves):
    if space:
      continue
    update = out.operands[IN_PLACE[out.opcode]] if out is not None and out.opcode in IN_PLACE \
        else None
    total += (shape_bytes(by_name[update].shape) if update in by_name
              else DTYPE_BYTES[dtype] * math.prod(dims))
  return total


def program_costs(hlo_text: str, causal_visits: bool = False, splash_density: float = 1.0,
                  attention: tuple[int, int] | None = None) -> ProgramCosts:
  """Walk the module from ENTRY; loop bodies counted trip-count times. A data-dependent loop
  runs its enclosing loop's count n (every block pair of a square grid visible), or with
  `causal_visits` (n + 1) / 2 on average (causal pairs of one device's own sequence).
  splash_density, attention = (T, head_dim): what `splash_cost` needs to cost splash's
  kernels (without them they are counted in `kernel_calls`, uncosted)."""
  comps, entry = parse_module(hlo_text)
  by_name = {i.name: i for body in comps.values() for i in body}
  shapes = {name: i.shape for name, i in by_name.items()}
  costs = ProgramCosts()
  fused_memo: dict[str, float] = {}

  def own_flops(instr: Instr) -> float:
    if instr.opcode == "dot":
      return dot_flops(instr, shapes)
    if instr.opcode == "convolution":
      return conv_flops(instr, shapes)
    if instr.opcode == "fusion":
      return sum(fused_flops(c) for c in called(instr.attrs, "calls"))
    return 0.0

  def fused_flops(name: str) -> float:
    if name not in fused_memo:
      fused_memo[name] = sum(own_flops(i) for i in comps.get(name, []))
    return fused_memo[name]

  def collective(instr: Instr, times: int) -> None:
    kind = COLLECTIVES[instr.opcode]
    pairs = [tuple(int(x) for x in p.split(",")) for p in
             re.findall(r"\{(\d+,\d+)\}", attr(instr.attrs, "source_target_pairs") or "")]
    costs.collectives.append(Collective(kind, instr.name, _payload(instr, kind, shapes),
                                        replica_groups(instr.attrs), pairs, times))

  def fused_collectives(name: str, times: int) -> None:  # collective matmuls, async wrappers
    for instr in comps.get(name, []):
      if instr.opcode in COLLECTIVES:
        collective(instr, times)
      for body in called(instr.attrs, "calls"):
        fused_collectives(body, times)

  def walk(name: str, times: float, outer_trips: float) -> None:
    for instr in comps.get(name, []):
      op = instr.opcode
      if op in COLLECTIVES:
        collective(instr, times)
      elif op == "custom-call" and "tpu_custom_call" in (
          attr(instr.attrs, "custom_call_target") or ""):
        cost = splash_cost(instr, shapes, splash_density, attention)
        if cost is None:
          costs.kernel_calls += times
        else:
          costs.splash_calls += times
          costs.matmul_flops += times * cost[0]
          costs.hbm_bytes += times * cost[1]
          costs.ops.append((cost[0], cost[1], times))
      elif op not in NO_TRAFFIC:
        flops = own_flops(instr)
        fused = called(instr.attrs, "calls") if op == "fusion" else []
        hbm = _traffic(instr, shapes, comps.get(fused[0]) if fused else None, comps)
        costs.matmul_flops += times * flops
        costs.hbm_bytes += times * hbm
        costs.ops.append((flops, hbm, times))
      if op == "while":
        n = trip_count(instr, comps, by_name)
        if n is None:  # data-dependent: the enclosing loop's count (a square block grid)
          costs.dynamic_loops += 1
          n = (outer_trips + 1) / 2 if causal_visits else outer_trips
        costs.loops.append((instr.name, n))
        for body in called(instr.attrs, "body"):
          walk(body, times * n, n)
      elif op == "conditional":
        branches = called(instr.attrs, "branch_computations") or (
            called(instr.attrs, "true_computation") + called(instr.attrs, "false_computation"))
        for branch in branches[:1]:  # one branch runs; the first stands for all
          walk(branch, times, outer_trips)
      elif op == "call":
        for body in called(instr.attrs, "to_apply"):
          walk(body, times, outer_trips)
      elif op == "async-start" or op.endswith("-start"):
        for body in called(instr.attrs, "calls"):
          walk(body, times, outer_trips)
      elif op == "fusion":
        for body in called(instr.attrs, "calls"):
          fused_collectives(body, times)

  walk(entry, 1, 1)
  return costs
