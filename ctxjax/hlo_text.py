"""Reading XLA's printed HLO (`compiled.as_text()`): instructions with their shapes, operands
and attributes, computations, replica groups in their three printed forms, and loop trip
counts. ctxjax/hlo_costs.py prices what this reads."""
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
  operands = [re.sub(r"/\*.*?\*/", "", o).split()[-1].lstrip("%")
              for o in _split_top(rest[paren + 1:close - 1])]
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


def attr(attrs: str, key: str) -> str | None:
  """The value of `key=` in an attribute list (a bracket group or a bare token)."""
  match = re.search(r"(?:^|[,\s])" + re.escape(key) + r"=", attrs)
  if not match:
    return None
  start = match.end()
  if attrs[start] in "{[":
    return attrs[start:_close(attrs, start)]
  return re.match(r"[^,\s]+", attrs[start:]).group(0)


def called(attrs: str, key: str) -> list[str]:
  value = attr(attrs, key)
  if value is None:
    return []
  return [v.strip().lstrip("%") for v in value.strip("{}").split(",") if v.strip()]


def dims_of(shape: str) -> tuple[int, ...]:
  found = arrays(shape)
  return found[0][1] if found else ()


def replica_groups(attrs: str) -> list[list[int]]:
  """Partition-id groups from the three printed forms; [] when absent."""
  value = attr(attrs, "replica_groups")
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


def _through(name: str, by_name: dict[str, Instr]) -> Instr | None:
  """The instruction behind `name`, looking through copies and converts."""
  instr = by_name.get(name)
  while instr is not None and instr.opcode in ("copy", "convert", "bitcast") and instr.operands:
    instr = by_name.get(instr.operands[0])
  return instr


def _constant(name: str, by_name: dict[str, Instr]) -> int | None:
  instr = _through(name, by_name)
  if instr is not None and instr.opcode == "constant" and re.fullmatch(r"-?\d+", instr.operands[0]):
    return int(instr.operands[0])
  return None


def _tuple_index(name: str, by_name: dict[str, Instr]) -> int | None:
  instr = _through(name, by_name)
  if instr is not None and instr.opcode == "get-tuple-element":
    return int(attr(instr.attrs, "index"))
  return None


def _unwrap(instr: Instr | None, comps: dict[str, list[Instr]]) -> Instr | None:
  """A fusion wrapping one op (XLA:CPU's `wrapped_compare`, `wrapped_add`) as that op applied
  to the fusion's operands; anything else as is."""
  if instr is None or instr.opcode != "fusion":
    return instr
  body = comps.get(called(instr.attrs, "calls")[0], [])
  inner = next((i for i in body if i.root), None)
  params = {i.name: int(i.operands[0]) for i in body if i.opcode == "parameter"}
  if inner is None or not all(o in params for o in inner.operands):
    return instr
  return dataclasses.replace(inner, operands=[instr.operands[params[o]] for o in inner.operands])


def trip_count(instr: Instr, comps: dict[str, list[Instr]],
               by_name: dict[str, Instr]) -> int | None:
  """A while loop's trip count: XLA's known_trip_count, else read off the loop: the condition
  `i < bound` (or `i <= bound`) on tuple element k, the body's `i + step` for element k, and
  the constant element k starts from. None when the bound is data (a data-dependent loop)."""
  config = attr(instr.attrs, "backend_config")
  if config:
    try:
      known = json.loads(config).get("known_trip_count")
    except ValueError:
      known = None
    if known and "n" in known:
      return int(known["n"])
  [cond], [body] = called(instr.attrs, "condition"), called(instr.attrs, "body")
  root = _unwrap(next((i for i in comps.get(cond, []) if i.root), None), comps)
  if root is None or root.opcode != "compare" or len(root.operands) != 2:
    return None
  direction = attr(root.attrs, "direction")
  a, b = root.operands
  if direction in ("GT", "GE"):
    a, b, direction = b, a, {"GT": "LT", "GE": "LE"}[direction]
  k, bound = _tuple_index(a, by_name), _constant(b, by_name)
  if k is None or bound is None or direction not in ("LT", "LE"):
    return None
  body_root = next((i for i in comps.get(body, []) if i.root), None)
  update = _unwrap(_through(body_root.operands[k], by_name), comps) if (
      body_root and body_root.opcode == "tuple") else None
  if update is None or update.opcode != "add":
    return None
  steps = [_constant(o, by_name) for o in update.operands if _tuple_index(o, by_name) is None]
  init_tuple = _through(instr.operands[0], by_name)
  init = (_constant(init_tuple.operands[k], by_name) if init_tuple is not None and
          init_tuple.opcode == "tuple" else None)
  if len(steps) != 1 or not steps[0] or steps[0] < 0 or init is None:
    return None
  span = bound - init + (direction == "LE")
  return max(0, -(-span // steps[0]))
