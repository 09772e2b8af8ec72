# LongMem (Wang et al. 2023) on configs/tiny.py: the trained tiny model is the FROZEN backbone
# (read in 64-token windows); the keys/values of its layer 2 for the last 192 tokens of earlier
# windows fill a FIFO memory; a 2-layer side network (side_layers_*, fresh, the only trained
# parameters: optim.trainable = ["side_"]) reads the backbone through cross-network residuals
# and, in its last layer, retrieves the 32 nearest memory entries per query (gate init 0).
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny.py --workdir=runs/tiny
#            python -m ctxjax.train --config=configs/tiny_longmem.py --workdir=runs/longmem \
#                --config.train.init_from=runs/tiny
# HARDWARE:  2 CPU cores shared with other jobs (load 9-14): 283 s for a 60-step run at
#            batch 4 (421 tokens/s); the full config was not run.
# EXPECTED:  measured 2026-12-05 with --config.train.steps=60 --config.data.batch_size=4
#            --config.train.eval_batches=4 (from a 60-step tiny run): eval_loss 5.760;
#            configs/tiny.py the same way: 5.797 (docs/memory.md, "Measured"; one seed).
from configs.tiny_memorizing import base, memory_model
from ctxjax.model.longmem import TRAINABLE


def get_config(arg: str = ""):
  config, layer = base(arg)
  config = memory_model(config, memory_kind="longmem", memory_layers=[layer],
                        memory_neighbors=32, side_layers=2, side_memory_layer=-1)
  config.optim.trainable = TRAINABLE
  config.optim.weight_decay = 0.0
  config.train.steps = 150
  config.train.init_from = ""  # set on the command line: the workdir of a configs/tiny.py run
  return config
