# Memorizing Transformer (Wu et al. 2022) on configs/tiny.py: each 256-token row is read as 4
# windows of 64 tokens (window-local positions); layer 2 of 4 (near the top, as meliad's
# memory_layer_indices=(-4,) of 12) also attends to its 32 nearest (key, value) pairs among the
# last 192 keys of earlier windows (a FIFO kNN memory, exact top-k), mixed with local attention
# by a per-head gate (sigmoid, initialised at 0 as LongMem). ctxjax/model/knn_memory.py.
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_memorizing.py --workdir=runs/memorizing
#            (inference over any length: ctxjax.model.memory_inference.run_windows / generate)
# `:passkey` (configs/tiny_memorizing.py:passkey, any memory config): the same memory on
# configs/tiny_passkey.py's 2-layer model and corpus, memory in the last layer
# (for the trainer; benchmarks/memory.py trains its own 2-layer phrase-tokenizer model).
# HARDWARE:  2 CPU cores shared with other jobs (load 9-14): 307 s for a 60-step run at
#            batch 4 (328 tokens/s); the full config was not run.
# EXPECTED:  measured 2026-12-05 with --config.train.steps=60 --config.data.batch_size=4
#            --config.train.eval_batches=4: eval_loss 5.697; configs/tiny.py the same way:
#            5.797 (docs/memory.md, "Measured"; one seed, not a comparison).
from configs import tiny, tiny_passkey

WINDOW = 64
BASES = {"": (tiny, 2), "passkey": (tiny_passkey, -1)}  # arg -> (base config, memory layer)


def base(arg: str):
  """(base config, its memory layer) for a memory config's argument."""
  if arg not in BASES:
    raise ValueError(f"config argument {arg!r}; valid choices: {sorted(BASES)}")
  module, layer = BASES[arg]
  return module.get_config(), layer


def memory_model(config, **memory):
  """A base config's model as a memory model (shared by the memory configs)."""
  defaults = dict(memory_window=WINDOW, memory_size=3 * WINDOW, memory_neighbors=0,
                  memory_cross_batch=0, memory_search="exact", memory_recall_target=0.95,
                  side_layers=0, side_memory_layer=-1)
  config.model.update({**defaults, **memory})
  return config


def get_config(arg: str = ""):
  config, layer = base(arg)
  return memory_model(config, memory_kind="memorizing", memory_layers=[layer],
                      memory_neighbors=32)
