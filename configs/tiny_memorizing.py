# Memorizing Transformer (Wu et al. 2022) on configs/tiny.py: each 256-token row is read as 4
# windows of 64 tokens (window-local positions); layer 2 of 4 (near the top, as meliad's
# memory_layer_indices=(-4,) of 12) also attends to its 32 nearest (key, value) pairs among the
# last 192 keys of earlier windows (a FIFO kNN memory, exact top-k), mixed with local attention
# by a per-head gate (sigmoid, initialised at 0 as LongMem). ctxjax/model/knn_memory.py.
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_memorizing.py --workdir=runs/memorizing
#            (inference over any length: ctxjax.model.memory_inference.run_windows / generate)
# HARDWARE:  2 CPU cores; see EXPECTED for the time.
# EXPECTED:  see docs/memory.md ("Memory layers") for the measured run.
from configs import tiny

WINDOW = 64


def memory_model(config, **memory):
  """configs/tiny.py's model as a memory model (shared by the memory configs)."""
  defaults = dict(memory_window=WINDOW, memory_size=3 * WINDOW, memory_neighbors=0,
                  memory_cross_batch=0, memory_search="exact", memory_recall_target=0.95,
                  side_layers=0, side_memory_layer=-1)
  config.model.update({**defaults, **memory})
  return config


def get_config():
  return memory_model(tiny.get_config(), memory_kind="memorizing", memory_layers=[2],
                      memory_neighbors=32)
