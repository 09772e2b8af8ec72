"""LongMem (Wang et al. 2023, "Augmenting Language Models with Long-Term Memory"): a FROZEN
backbone (the plain decoder layers, layers_i) whose keys/values of one layer
(`model.memory_layers[0]`) are cached as memory for earlier windows, and a small trainable side
network (side_layers_j) that reads them in one memory-retrieval layer (`model.side_memory_layer`,
joint local + memory attention mixed by a per-head gate initialised at 0, memory_layer.py).

The side network starts from the embedding output and, as LongMem's cross-network residual
(Section 3.2, H_side^l += H_back^{r(l)} - H_back^{r(l-1)}), adds the change of the backbone's
hidden state over the backbone layers that side layer j stands for (r(j) = (j+1)L/S). Every
backbone output passes through stop_gradient, and the head (norm, lm_head) is read frozen
(Transformer.__call__), so only side_* parameters get gradients: train with
`optim.trainable = ["side_"]` (ctxjax/train/trainable.py).
"""
from __future__ import annotations

import jax

from ctxjax.model.layers import Block

TRAINABLE = ["side_"]  # optim.trainable for a LongMem run


def backbone_and_side(cfg, train: bool, x_BTE, positions_BT, segment_ids_BT):
  """The side network's output [B, T, E] (the backbone's own output is not used)."""
  source = cfg.memory_layers[0]
  hidden = [jax.lax.stop_gradient(x_BTE)]
  source_kv = None
  h = x_BTE
  for i in range(cfg.num_hidden_layers):
    out = Block(cfg, False, return_kv=i == source, name=f"layers_{i}")(
        h, positions_BT, segment_ids_BT)
    if i == source:
      out, source_kv = out
    h = out
    hidden.append(jax.lax.stop_gradient(h))
  source_kv = jax.lax.stop_gradient(source_kv)

  depth, layers = cfg.side_layers, cfg.num_hidden_layers
  reach = [(j + 1) * layers // depth for j in range(depth)]  # backbone layer side j stands for
  s = hidden[0]
  for j in range(depth):
    memory = j == cfg.side_memory_layer
    s = Block(cfg, train, memory=memory, name=f"side_layers_{j}")(
        s, positions_BT, segment_ids_BT, source_kv=source_kv if memory else None)
    s = s + (hidden[reach[j]] - hidden[reach[j - 1] if j else 0])
  return s
