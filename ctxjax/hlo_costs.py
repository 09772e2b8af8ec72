"""Per-device costs of a compiled XLA program, read from its post-optimisation HLO text.

`compiled.cost_analysis()` counts a while loop's body once, so a program with scanned layers,
a ring's scan or gradient accumulation is undercounted by the trip counts. `program_costs`
walks the HLO computations from ENTRY instead, multiplying each loop body by its trip count
(the `known_trip_count` backend config XLA attaches, else the constant its condition compares
the induction variable with). A loop with a data-dependent trip count (blockwise attention's
visit lists, ctxjax/attention/blockwise.py) is counted at its enclosing loop's trip count: on
the square block grid of one device's shard that is every block pair visible, the busiest ring
device's count each step (causal skipping on one device would halve it). It returns:

- matmul FLOPs: 2 x output elements x contracted size for every `dot`, and the valid
  multiply-adds of every `convolution` (the TPU compiler rewrites many dots as convolutions),
  inside fusions too;
- HBM bytes: operand + result bytes of every instruction that runs outside a fusion (a
  fusion's internals stay on chip), skipping bookkeeping ops and arrays the layout places in
  another memory space (`S(n)`: TPU VMEM / semaphores); an operand read only through slices
  (dynamic-slice, gather) counts the slices, an in-place update (dynamic-update-slice,
  scatter: a loop's `put_blocks`) the update, not the whole buffer;
- collectives: kind, payload bytes, replica groups (explicit, iota `[G,S]<=[..]T(..)`, or the
  `mesh[...] {axes}` form) or permute pairs, and how many times each runs.

Partition ids in the groups are positions in the compiled device assignment (row-major over
the mesh for a program jitted over it); ctxjax/roofline.py maps them to mesh axes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
               "u32": 4, "s64": 8, "u64": 8, "bf16": 2, "f16": 2, "f32": 4, "f64": 8,
               "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0}
COLLECTIVES = {"all-gather": "all-gather", "all-gather-start": "all-gather",
               "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
               "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all",
               "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
               "collective-permute-start": "collective-permute"}
# No HBM traffic of their own: aliases, control flow (its bodies are walked), async halves.
NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
              "conditional", "partition-id", "replica-id", "after-all", "opt-barrier",
              "iota", "copy-done", "all-gather-done", "all-reduce-done",
              "collective-permute-done", "async-done", "async-update", "send-done",
              "recv-done", "add-dependency", "domain", "custom-call"}

# Ops that read only the part of operand 0 they output, and ops that write an update into
# operand 0 in place (its other elements are neither read nor written).
SLICE_READS = {"dynamic-slice", "gather", "slice"}
IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}   # opcode -> index of the update operand

_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+) = ")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+) \(.*\{\s*$")


@dataclasses.dataclass
class Instr:
  name: str
  opcode: str
  shape: str                 # result shape text, layouts included
  operands: list[str]
  attrs: str                 # everything after the operand list
  root: bool = False         # the computation's result


@dataclasses.dataclass
class Collective:
  kind: str                  # all-gather | all-reduce | reduce-scatter | all-to-all | collective-permute
  name: str
  payload_bytes: float       # gathered result / scattered input / reduced or sent buffer
  groups: list[list[int]]    # partition ids per group ([] = unknown)
  pairs: list[tuple[int, int]]  # collective-permute source -> target
  count: int                 # executions per step (loop trip counts multiplied)


@dataclasses.dataclass
class ProgramCosts:
  matmul_flops: float = 0.0
  hbm_bytes: float = 0.0
  collectives: list[Collective] = dataclasses.field(default_factory=list)
  ops: list[tuple[float, float, int]] = dataclasses.field(default_factory=list)
  # ^ (matmul FLOPs, HBM bytes, executions) of every instruction that runs outside a fusion
  loops: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (while, trip count)
  dynamic_loops: int = 0     # data-dependent trip counts, taken as the enclosing loop's


def arrays(shape: str) -> list[tuple[str, tuple[int, ...], int]]:
  """[(dtype, dims, memory space)] of every array in a shape text (tuples flattened)."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype not in DTYPE_BYTES:
      continue
    space = re.search(r"S\((\d+)\)", layout or "")
    out.append((dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1))
                if space else 0))
  return out


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
  return sum(DTYPE_BYTES[t] * math.prod(d) for t, d, s in arrays(shape) if not (hbm_only and s))


def _split_top(text: str, sep: str = ",") -> list[str]:
  """Split at `sep` outside brackets."""
  parts, depth, cur = [], 0, []
  for ch in text:
    if ch in "([{<":
      depth += 1
    elif ch in ")]}>":
      depth -= 1
    if ch == sep and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  parts.append("".join(cur))
  return [p.strip() for p in parts if p.strip()]


def _close(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += text[i] in "([{"
    depth -= text[i] in ")]}"
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


def parse_instruction(line: str) -> Instr | None:
  match = _INSTR.match(line)
  if not match:
    return None
  rest = line[match.end():]
  end = _close(rest, 0) if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.index("(")
  opcode = rest[:paren]
  close = _close(rest, paren)
  operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[paren + 1:close - 1])]
  return Instr(match.group(2), opcode, shape, operands, rest[close:], bool(match.group(1)))


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
  """({computation name: instructions}, entry name) of an HLO module's text."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = comps.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
      continue
    if current is not None and line.strip() == "}":
      current = None
      continue
    if current is not None:
      instr = parse_instruction(line)
      if instr is not None:
        current.append(instr)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _attr(attrs: str, key: str) -> str | None:
  """The value of `key=` in an attribute list (a bracket group or a bare token)."""
  match = re.search(r"(?:^|[,\s])" + re.escape(key) + r"=", attrs)
  if not match:
    return None
  start = match.end()
  if attrs[start] in "{[":
    return attrs[start:_close(attrs, start)]
  return re.match(r"[^,\s]+", attrs[start:]).group(0)


def _called(attrs: str, key: str) -> list[str]:
  value = _attr(attrs, key)
  if value is None:
    return []
  return [v.strip().lstrip("%") for v in value.strip("{}").split(",") if v.strip()]


def dims_of(shape: str) -> tuple[int, ...]:
  found = arrays(shape)
  return found[0][1] if found else ()


def dot_flops(instr: Instr, shapes: dict[str, str]) -> float:
  lhs = dims_of(shapes[instr.operands[0]])
  contract = [int(d) for d in (_attr(instr.attrs, "lhs_contracting_dims") or "{}").strip("{}")
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
  labels = _attr(instr.attrs, "dim_labels")
  lhs_l, rest = labels.split("_")
  rhs_l, out_l = rest.split("->")
  lhs, rhs, out = (dims_of(shapes[instr.operands[0]]), dims_of(shapes[instr.operands[1]]),
                   dims_of(instr.shape))
  window = {}
  for item in (_attr(instr.attrs, "window") or "{}").strip("{}").split():
    key, value = item.split("=")
    window[key] = value.split("x")
  spatial = [c for c in lhs_l if c.isdigit()]
  macs = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")]
  for k, dim in enumerate(spatial):
    get = lambda key, default: int(window[key][k]) if key in window else default
    pad_lo = int(window["pad"][k].split("_")[0]) if "pad" in window else 0
    macs *= _valid_taps(lhs[lhs_l.index(dim)], out[out_l.index(dim)],
                        rhs[rhs_l.index(dim)], get("stride", 1), pad_lo, get("lhs_dilate", 1),
                        get("rhs_dilate", 1))
  return 2.0 * macs


def replica_groups(attrs: str) -> list[list[int]]:
  """Partition-id groups from the three printed forms; [] when absent."""
  value = _attr(attrs, "replica_groups")
  if value is None:
    return []
  if value.startswith("{"):
    return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", value[1:-1])]
  if value.startswith("mesh"):
    text = attrs[attrs.index("replica_groups=mesh") + len("replica_groups="):]
    sizes = [(n, int(s)) for n, s in re.findall(r"'(\w+)'=(\d+)", text[:text.index("]") + 1])]
    chosen = re.match(r"mesh\[[^\]]*\]\s*\{([^}]*)\}", text)
    names = [n for n, _ in sizes]
    axes = ([names.index(a.strip().strip("'")) for a in chosen.group(1).split(",") if a.strip()]
            if chosen else list(range(len(names))))
    ids = np.arange(math.prod(s for _, s in sizes)).reshape([s for _, s in sizes])
    keep = [i for i in range(len(names)) if i not in axes]
    ids = ids.transpose(keep + axes).reshape(-1, math.prod(sizes[a][1] for a in axes))
    return ids.tolist()
  match = re.fullmatch(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", value)
  if not match:  # ...] with a transpose printed after the value token
    match = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?",
                     attrs[attrs.index("replica_groups=") + len("replica_groups="):])
  groups, size, dims, perm = match.groups()
  ids = np.arange(math.prod(int(d) for d in dims.split(","))).reshape(
      [int(d) for d in dims.split(",")])
  if perm:
    ids = ids.transpose([int(p) for p in perm.split(",")])
  return ids.reshape(int(groups), int(size)).tolist()


def trip_count(instr: Instr, comps: dict[str, list[Instr]]) -> int | None:
  """A while loop's trip count: XLA's known_trip_count, else `i < constant` in its condition."""
  config = _attr(instr.attrs, "backend_config")
  if config:
    try:
      known = json.loads(config).get("known_trip_count")
    except ValueError:
      known = None
    if known and "n" in known:
      return int(known["n"])
  [cond] = _called(instr.attrs, "condition")
  constants = [int(i.operands[0]) for i in comps.get(cond, []) if i.opcode == "constant"
               and i.operands and re.fullmatch(r"-?\d+", i.operands[0])]
  return constants[0] if len(constants) == 1 else None


def _payload(instr: Instr, kind: str, shapes: dict[str, str]) -> float:
  operand = sum(shape_bytes(shapes[o]) for o in instr.operands if o in shapes)
  if kind == "all-gather":  # the gathered result (the -start op's tuple holds the input too)
    return max(DTYPE_BYTES[t] * math.prod(d) for t, d, _ in arrays(instr.shape))
  if kind == "reduce-scatter":
    return operand
  if instr.opcode.endswith("-start"):
    return operand
  return shape_bytes(instr.shape)


def _traffic(instr: Instr, shapes: dict[str, str], body: list[Instr] | None) -> float:
  """HBM bytes an instruction outside fusions moves: its operands and result, except the
  parts of an operand that a slice never reads and the parts of an in-place buffer that an
  update never touches (a fusion is looked into: `body` is its fused computation)."""
  def size(name):
    return shape_bytes(shapes[name], True) if name in shapes else 0.0

  if body is None:  # a lone op
    if instr.opcode in SLICE_READS:  # reads at most what it outputs (a gather may repeat rows)
      out = shape_bytes(instr.shape, True)
      return out + min(out, size(instr.operands[0]))
    if instr.opcode in IN_PLACE:
      return 2 * size(instr.operands[IN_PLACE[instr.opcode]])
    return shape_bytes(instr.shape, True) + sum(size(o) for o in instr.operands)
  params = {int(i.operands[0]): i.name for i in body if i.opcode == "parameter"}
  users: dict[str, list[tuple[Instr, int]]] = {}
  for i in body:
    for k, o in enumerate(i.operands):
      users.setdefault(o, []).append((i, k))
  total = 0.0
  for k, operand in enumerate(instr.operands):
    uses = users.get(params.get(k), [])
    if not uses or any(pos != 0 or u.opcode not in SLICE_READS and u.opcode not in IN_PLACE
                       for u, pos in uses):
      total += size(operand)  # read whole
    else:  # read through slices only, or the buffer an update is written into
      total += min(size(operand), sum(shape_bytes(u.shape) for u, _ in uses
                                      if u.opcode in SLICE_READS))
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


def program_costs(hlo_text: str) -> ProgramCosts:
  """Walk the module from ENTRY; loop bodies counted trip-count times."""
  comps, entry = parse_module(hlo_text)
  shapes = {i.name: i.shape for body in comps.values() for i in body}
  costs = ProgramCosts()
  fused_memo: dict[str, float] = {}

  def own_flops(instr: Instr) -> float:
    if instr.opcode == "dot":
      return dot_flops(instr, shapes)
    if instr.opcode == "convolution":
      return conv_flops(instr, shapes)
    if instr.opcode == "fusion":
      return sum(fused_flops(c) for c in _called(instr.attrs, "calls"))
    return 0.0

  def fused_flops(name: str) -> float:
    if name not in fused_memo:
      fused_memo[name] = sum(own_flops(i) for i in comps.get(name, []))
    return fused_memo[name]

  def collective(instr: Instr, times: int) -> None:
    kind = COLLECTIVES[instr.opcode]
    pairs = [tuple(int(x) for x in p.split(",")) for p in
             re.findall(r"\{(\d+,\d+)\}", _attr(instr.attrs, "source_target_pairs") or "")]
    costs.collectives.append(Collective(kind, instr.name, _payload(instr, kind, shapes),
                                        replica_groups(instr.attrs), pairs, times))

  def fused_collectives(name: str, times: int) -> None:  # collective matmuls, async wrappers
    for instr in comps.get(name, []):
      if instr.opcode in COLLECTIVES:
        collective(instr, times)
      for body in _called(instr.attrs, "calls"):
        fused_collectives(body, times)

  def walk(name: str, times: int, outer_trips: int) -> None:
    for instr in comps.get(name, []):
      op = instr.opcode
      if op in COLLECTIVES:
        collective(instr, times)
      elif op not in NO_TRAFFIC:
        flops = own_flops(instr)
        fused = _called(instr.attrs, "calls") if op == "fusion" else []
        hbm = _traffic(instr, shapes, comps.get(fused[0]) if fused else None)
        costs.matmul_flops += times * flops
        costs.hbm_bytes += times * hbm
        costs.ops.append((flops, hbm, times))
      if op == "while":
        n = trip_count(instr, comps)
        if n is None:  # data-dependent: the enclosing loop's count (a square block grid)
          costs.dynamic_loops += 1
          n = outer_trips
        costs.loops.append((instr.name, n))
        for body in _called(instr.attrs, "body"):
          walk(body, times * n, n)
      elif op == "conditional":
        branches = _called(instr.attrs, "branch_computations") or (
            _called(instr.attrs, "true_computation") + _called(instr.attrs, "false_computation"))
        for branch in branches[:1]:  # one branch runs; the first stands for all
          walk(branch, times, outer_trips)
      elif op == "call":
        for body in _called(instr.attrs, "to_apply"):
          walk(body, times, outer_trips)
      elif op == "async-start" or op.endswith("-start"):
        for body in _called(instr.attrs, "calls"):
          walk(body, times, outer_trips)
      elif op == "fusion":
        for body in _called(instr.attrs, "calls"):
          fused_collectives(body, times)

  walk(entry, 1, 1)
  return costs
