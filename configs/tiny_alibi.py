# The tiny model with ALiBi (Press et al. 2022): no position embeddings, a per-head linear
# distance penalty in attention computed from global positions.
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_alibi.py --workdir=runs/alibi
# HARDWARE:  2 CPU cores, ~3 minutes.
# EXPECTED:  eval_loss close to configs/tiny.py (RoPE) at this scale.
from configs import tiny


def get_config():
  config = tiny.get_config()
  config.model.position_embedding_type = "alibi"
  return config
