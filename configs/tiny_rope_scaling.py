# The tiny model extended from a 256-token original context with each RoPE scaling of the survey,
# trained at 512 tokens (Hugging Face key names; ctxjax matches transformers' frequencies).
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_rope_scaling.py:yarn --workdir=runs/yarn
#            (argument: linear | ntk | dynamic | yarn | llama3 | longrope | abf)
# HARDWARE:  2 CPU cores, a few minutes.
# EXPECTED:  trains like configs/tiny.py (eval_loss well below the unigram entropy); the point is
#            the frequencies, tested against transformers in tests/test_rope.py.
from configs import tiny

ORIGINAL = 256  # the "pretraining" context the scaling extends from
TARGET = 1024   # max_position_embeddings after extension
HALF_DIM = 32   # head_dim // 2 of the tiny model

SCALINGS = {
    "linear": dict(rope_type="linear", factor=TARGET / ORIGINAL),
    "ntk": dict(rope_type="ntk", factor=TARGET / ORIGINAL),
    # Dynamic NTK reads max_position_embeddings as the original length (as transformers'
    # _compute_dynamic_ntk_parameters does; bloc97, 2023).
    "dynamic": dict(rope_type="dynamic", factor=TARGET / ORIGINAL),
    "yarn": dict(rope_type="yarn", factor=TARGET / ORIGINAL,
                 original_max_position_embeddings=ORIGINAL, beta_fast=32.0, beta_slow=1.0),
    "llama3": dict(rope_type="llama3", factor=TARGET / ORIGINAL, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=ORIGINAL),
    "longrope": dict(rope_type="longrope", original_max_position_embeddings=ORIGINAL,
                     short_factor=[1.0] * HALF_DIM,
                     long_factor=[1.0 + 3.0 * i / (HALF_DIM - 1) for i in range(HALF_DIM)]),
    "abf": None,  # ABF (Xiong et al. 2023): plain RoPE with a larger base, see rope_theta below
}


def get_config(arg: str = "yarn"):
  if arg not in SCALINGS:
    raise ValueError(f"configs/tiny_rope_scaling.py:{arg}; valid choices: {sorted(SCALINGS)}")
  config = tiny.get_config()
  config.model.rope_scaling = SCALINGS[arg]
  config.model.max_position_embeddings = ORIGINAL if arg == "dynamic" else TARGET
  if arg == "abf":
    config.model.rope_theta = 500_000.0
  config.data.seq_len = 512
  config.data.batch_size = 4  # constant tokens per step vs tiny.py
  return config
