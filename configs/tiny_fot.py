# Focused Transformer (Tworkowski et al. 2023, LongLLaMA) on configs/tiny.py: each 256-token row
# is read as 4 windows of 64 tokens (the local context, LongLLaMA's last_context_length); memory
# layer 2 attends in one softmax to its window and to the keys/values of the previous 3 windows
# of its document (RoPE-encoded as at position 0), and, in training only, to the same keys of 3
# other rows of the batch (cross-batch negatives, back-propagated through). At inference the
# memory holds the last 192 keys of earlier windows of the same input.
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_fot.py --workdir=runs/fot
# HARDWARE:  2 CPU cores shared with other jobs (load 9-14): 342 s for a 60-step run at
#            batch 4 (271 tokens/s); the full config was not run.
# EXPECTED:  measured 2026-12-05 with --config.train.steps=60 --config.data.batch_size=4
#            --config.train.eval_batches=4: eval_loss 5.739; configs/tiny.py the same way:
#            5.797 (docs/memory.md, "Measured"; one seed, not a comparison).
from configs.tiny_memorizing import base, memory_model


def get_config(arg: str = ""):
  config, layer = base(arg)
  return memory_model(config, memory_kind="fot", memory_layers=[layer], memory_cross_batch=3)
