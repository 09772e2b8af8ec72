# Training-time position generators feeding the same RoPE model: PoSE (Zhu et al. 2024;
# skip-wise ids so a 256-token window covers positions up to 2048) and randomized positional
# encodings (Ruoss et al. 2023; a sorted random subset of [0, 2048)).
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_position_ids.py:pose --workdir=runs/pose
#            (argument: pose | randomized)
# HARDWARE:  2 CPU cores, ~3 minutes.
# EXPECTED:  eval_loss (contiguous positions) a little above configs/tiny.py; the model has seen
#            relative distances up to 2048 while training on 256-token windows.
from configs import tiny

KINDS = ("pose", "randomized")


def get_config(arg: str = "pose"):
  if arg not in KINDS:
    raise ValueError(f"configs/tiny_position_ids.py:{arg}; valid choices: {list(KINDS)}")
  config = tiny.get_config()
  config.data.position_ids = arg
  config.data.max_position_id = 2048
  config.model.max_position_embeddings = 2048
  # PoSE packs one document per row in the paper; with packed rows its ids span the whole row.
  config.data.packed_positions = "continuous"
  return config
