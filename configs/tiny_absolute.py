# Classical baselines: sinusoidal (Vaswani et al. 2017) or learned absolute position embeddings,
# and NoPE (no positional information besides the causal mask; Kazemnejad et al. 2023).
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_absolute.py:sinusoidal --workdir=runs/sin
#            (argument: sinusoidal | learned | none)
# HARDWARE:  2 CPU cores, ~3 minutes.
# EXPECTED:  trains at 256 tokens; learned/sinusoidal stop with an error past
#            max_position_embeddings, which is the point of the comparison.
from configs import tiny

KINDS = ("sinusoidal", "learned", "none")


def get_config(arg: str = "sinusoidal"):
  if arg not in KINDS:
    raise ValueError(f"configs/tiny_absolute.py:{arg}; valid choices: {list(KINDS)}")
  config = tiny.get_config()
  config.model.position_embedding_type = arg
  config.model.max_position_embeddings = 512
  # Positions 0..seq_len-1 in every row: per-document offsets of long files pass the table.
  config.data.packed_positions = "continuous"
  return config
