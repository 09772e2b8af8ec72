"""The decoder layers of a memory model (`model.memory_kind` != none), called by Transformer
between the embedding and the head; parameters keep the plain model's names (layers_i/...), so
a plain checkpoint starts a memory model (`train.init_from`).

Every layer attends inside windows of `model.memory_window` tokens at window-local positions
(memory_layer.window_layout); memory layers (memorizing, fot) also attend to earlier windows
through the memory; longmem runs the frozen backbone and then its side network (longmem.py).
"""
from __future__ import annotations

from ctxjax.model import longmem, memory_layer
from ctxjax.model.layers import Block


def decoder_layers(cfg, train: bool, x_BTE, segment_ids_BT):
  """x after the decoder layers of a memory model (positions are the windows' own)."""
  positions_BT, segment_ids_BT = memory_layer.window_layout(segment_ids_BT, cfg.memory_window)
  if cfg.memory_kind == "longmem":
    return longmem.backbone_and_side(cfg, train, x_BTE, positions_BT, segment_ids_BT)
  for i in range(cfg.num_hidden_layers):
    x_BTE = Block(cfg, train, memory=i in cfg.memory_layers, name=f"layers_{i}")(
        x_BTE, positions_BT, segment_ids_BT)
  return x_BTE


def memory_paths(cfg) -> list[tuple[str, ...]]:
  """Module paths of the layers that carry a memory state (the "memory" collection)."""
  if cfg.memory_kind == "longmem":
    return [(f"side_layers_{cfg.side_memory_layer}", "self_attn")]
  return [(f"layers_{i}", "self_attn") for i in cfg.memory_layers]
