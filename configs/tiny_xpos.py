# The tiny model with xPos (Sun et al. 2023): RoPE plus an exponential per-pair decay
# zeta_i^((m-n)/scale_base), gamma 0.4, scale_base 512.
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_xpos.py --workdir=runs/xpos
# HARDWARE:  2 CPU cores, ~3 minutes.
# EXPECTED:  eval_loss close to configs/tiny.py (RoPE) at this scale.
from configs import tiny


def get_config():
  config = tiny.get_config()
  config.model.position_embedding_type = "xpos"
  config.model.xpos_scale_base = 512.0
  config.model.xpos_gamma = 0.4
  return config
