# GrowLength (Jin et al. 2023) on the tiny model: 64 -> 128 -> 256 -> 512 tokens at a constant
# 2048 tokens per step (batch 32 -> 16 -> 8 -> 4), 75 steps per stage, versus the same 300 steps
# and 614K tokens at a fixed 512 (`:fixed`). Both end at seq_len 512 and evaluate there.
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_growlength.py --workdir=runs/grow
#            python -m ctxjax.train --config=configs/tiny_growlength.py:fixed --workdir=runs/fixed
#            (or both at once: python benchmarks/growlength.py)
# HARDWARE:  2 CPU cores, a few minutes each.
# EXPECTED:  see benchmarks/README.md "GrowLength vs fixed length" (measured 2026-11-22).
from configs import tiny

TOKENS_PER_STEP = 2048
STEPS_PER_STAGE = 75
LENGTHS = (64, 128, 256, 512)


def get_config(arg: str = "growlength"):
  """arg: "growlength" | "fixed", optionally ",STEPS_PER_STAGE" (e.g. "fixed,20")."""
  kind, _, steps = arg.partition(",")
  if kind not in ("growlength", "fixed"):
    raise ValueError(f"configs/tiny_growlength.py argument {arg!r}; valid: growlength, fixed "
                     "(optionally followed by ,STEPS_PER_STAGE)")
  per_stage = int(steps or STEPS_PER_STAGE)
  config = tiny.get_config()
  config.data.seq_len = LENGTHS[-1]
  config.data.batch_size = TOKENS_PER_STEP // LENGTHS[-1]
  config.train.steps = per_stage * len(LENGTHS)
  config.train.save_every = 0
  config.optim.warmup_steps = min(config.optim.warmup_steps, per_stage)
  if kind == "growlength":
    # The token budget per stage is fixed; the batch follows from tokens per step / seq_len.
    config.stages = [dict(seq_len=n, steps=per_stage) for n in LENGTHS]
  return config
