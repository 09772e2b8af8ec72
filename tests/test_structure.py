"""The package's shape is part of its contract: dependencies point one way (positions ->
attention -> model -> (data, hf) -> train/eval -> commands), no import cycle anywhere (imports
inside functions count: they are dependencies too), and no file grows past 450 lines. Read from
the source alone; nothing is imported."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ctxjax"
MAX_LINES = 450
# package -> packages it must never import (lowest layers first)
NEVER = {
    "registry": {"positions", "attention", "model", "data", "hf", "train", "eval"},
    "positions": {"attention", "model", "data", "hf", "train", "eval"},
    "attention": {"model", "data", "hf", "train", "eval"},
    "model": {"data", "hf", "train", "eval"},
    "data": {"model", "hf", "train", "eval"},
    "hf": {"train", "eval"},
    "train": {"eval"},
}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every ctxjax module `path` imports, at any depth of its code."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      out.add(module)
      out.update(f"{module}.{a.name}" for a in node.names)  # `from pkg import module`
  return {m for m in out if m == "ctxjax" or m.startswith("ctxjax.")}


def _graph() -> dict[str, set[str]]:
  files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
  return {name: {m for m in _imports(f) if m in files and m != name}
          for name, f in files.items()}


def _layer(module: str) -> str:
  parts = module.split(".")
  if len(parts) < 2 or parts[-1] == "__main__":  # `python -m ctxjax.x` is a command
    return ""
  return "hf" if parts[1].startswith("hf") else parts[1]


def _cycles(graph):
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycle():
  # a package importing its own submodules in __init__ is not a cycle of concern, but any
  # longer loop is
  graph = _graph()
  for pkg in [m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()]:
    graph[pkg] = {m for m in graph[pkg] if not m.startswith(pkg + ".")}
  assert _cycles(graph) == []


def test_layering():
  crossings = [f"{src} imports {dst}" for src, deps in sorted(_graph().items())
               for dst in sorted(deps) if _layer(dst) in NEVER.get(_layer(src), ())]
  assert crossings == []


def test_the_checks_catch_a_cycle_and_a_crossing():
  graph = {"ctxjax.data.a": {"ctxjax.train.b"}, "ctxjax.train.b": {"ctxjax.data.a"}}
  assert _cycles(graph) == [["ctxjax.data.a", "ctxjax.train.b"]]
  assert "train" in NEVER[_layer("ctxjax.data.a")]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(PACKAGE.parent))
                                        for p in PACKAGE.rglob("*.py")))
def test_file_length(path):
  lines = (PACKAGE.parent / path).read_text(encoding="utf-8").count("\n")
  assert lines <= MAX_LINES, f"{path} has {lines} lines (limit {MAX_LINES}): split it by concept"
