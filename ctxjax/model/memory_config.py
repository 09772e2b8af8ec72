"""Validation of the memory-model keys of `config.model` (ModelConfig's memory_* and side_*).

  memory_kind          none | memorizing | fot | longmem (MEMORY_KINDS)
  memory_layers        layer indices (negative from the top) with memory attention; for longmem
                       the ONE backbone layer whose keys/values fill the memory
  memory_window        W: the local context; a row is read as windows of W tokens
  memory_size          FIFO capacity in entries (keys) per row and layer
  memory_neighbors     top-k entries per query (0 = attend to the whole memory)
  memory_cross_batch   fot only: other batch rows whose keys are training negatives
  memory_search        exact (lax.top_k) | approx (lax.approx_max_k)
  memory_recall_target approx_max_k's recall target
  side_layers          longmem: depth of the trainable side network
  side_memory_layer    longmem: the side layer with memory attention (negative from the top)
"""
from __future__ import annotations

from ctxjax.registry import Registry, unknown_choice

MEMORY_KINDS: Registry[str] = Registry("model.memory_kind")
for _name, _about in (
    ("none", "no memory"),
    ("memorizing", "kNN memory in chosen layers, gated (Wu et al. 2022)"),
    ("fot", "memory layers with cross-batch training (Tworkowski et al. 2023)"),
    ("longmem", "frozen backbone + side network reading its memory (Wang et al. 2023)")):
  MEMORY_KINDS.add(_name, _about)
SEARCHES = ("exact", "approx")


def _int(merged, key, minimum):
  value = merged[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"model.{key} must be an integer >= {minimum}, got {value!r}")
  return value


def _layer(value, count: int, key: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not -count <= value < count:
    raise ValueError(f"model.{key} entries must be layer indices in [-{count}, {count}), "
                     f"got {value!r}")
  return value % count


def validate(merged: dict, scheme) -> None:
  """Check and normalise (in place) the memory keys of a merged model config dict."""
  kind = merged["memory_kind"]
  MEMORY_KINDS.get(kind)
  layers = merged["memory_layers"]
  if not isinstance(layers, (list, tuple)):
    raise ValueError(f"model.memory_layers must be a list of layer indices, got {layers!r}")
  if kind == "none":
    if layers or merged["side_layers"]:
      raise ValueError("model.memory_layers / model.side_layers are set but model.memory_kind="
                       "'none'; set model.memory_kind to one of "
                       f"{[k for k in MEMORY_KINDS if k != 'none']}")
    merged["memory_layers"] = ()
    return
  n = merged["num_hidden_layers"]
  merged["memory_layers"] = tuple(sorted({_layer(i, n, "memory_layers") for i in layers}))
  if not layers:
    raise ValueError(f"model.memory_kind={kind!r} needs model.memory_layers (layer indices)")
  for key, minimum in (("memory_window", 1), ("memory_size", 1), ("memory_neighbors", 0),
                       ("memory_cross_batch", 0), ("side_layers", 0)):
    _int(merged, key, minimum)
  if merged["memory_neighbors"] > merged["memory_size"]:
    raise ValueError(f"model.memory_neighbors={merged['memory_neighbors']} exceeds "
                     f"model.memory_size={merged['memory_size']}")
  if merged["memory_search"] not in SEARCHES:
    raise ValueError(unknown_choice("model.memory_search", merged["memory_search"], SEARCHES))
  if not 0.0 < float(merged["memory_recall_target"]) <= 1.0:
    raise ValueError(f"model.memory_recall_target must be in (0, 1], got "
                     f"{merged['memory_recall_target']!r}")
  merged["memory_recall_target"] = float(merged["memory_recall_target"])
  if merged["memory_cross_batch"] and kind != "fot":
    raise ValueError(f"model.memory_cross_batch is Focused Transformer training; set it to 0 "
                     f"for model.memory_kind={kind!r}")
  if merged["scan_layers"]:
    raise ValueError(f"model.memory_kind={kind!r} needs model.scan_layers=False (memory layers "
                     "differ from the others)")
  if merged["attention_mode"] != "standard":
    raise ValueError(f"model.memory_kind={kind!r} needs model.attention_mode='standard', got "
                     f"{merged['attention_mode']!r}")
  if scheme.rotate_qk is None:
    raise ValueError(f"model.memory_kind={kind!r} needs a rotary position_embedding_type "
                     f"(rope or xpos), got {scheme.name!r}")
  if kind == "longmem":
    if len(merged["memory_layers"]) != 1:
      raise ValueError("model.memory_kind='longmem' takes ONE backbone layer in "
                       f"model.memory_layers (its keys/values fill the memory), got {layers!r}")
    if merged["side_layers"] < 1:
      raise ValueError("model.memory_kind='longmem' needs model.side_layers >= 1")
    merged["side_memory_layer"] = _layer(merged["side_memory_layer"], merged["side_layers"],
                                         "side_memory_layer")
  elif merged["side_layers"]:
    raise ValueError(f"model.side_layers is LongMem's side network; set it to 0 for "
                     f"model.memory_kind={kind!r}")
