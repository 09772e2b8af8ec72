"""Progressive training as data: a list of stages (GrowLength, Jin et al. 2023; LWM-style
rope_theta increases), each with its sequence length, length in steps or tokens, batch and
optional positional changes. One run walks the stages, recompiling once per stage, under one
continuous learning-rate schedule; a resumed run re-enters the stage its step belongs to.

  config.stages = [dict(seq_len=64, tokens=262144),
                   dict(seq_len=128, tokens=262144, rope_theta=5e4), ...]

By default the global batch in TOKENS stays constant (`config.data.batch_size *
config.data.seq_len`), so the batch halves when the length doubles (MaxText #801's lesson).
Without `config.stages`, the run is one stage of data.seq_len x train.steps.
"""
from __future__ import annotations

import dataclasses

POSITIONAL_KEYS = ("rope_theta", "rope_scaling", "max_position_embeddings")
STAGE_KEYS = ("seq_len", "steps", "tokens", "batch_size") + POSITIONAL_KEYS


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  seq_len: int
  batch_size: int
  steps: int
  first_step: int                   # global step number of the stage's first step (1-based)
  model_overrides: dict

  @property
  def last_step(self) -> int:
    return self.first_step + self.steps - 1


def resolve_stages(config) -> list[Stage]:
  raw = config.get("stages", None)
  if not raw:
    return [Stage(0, config.data.seq_len, config.data.batch_size, config.train.steps, 1, {})]
  tokens_per_batch = config.data.batch_size * config.data.seq_len
  stages, first = [], 1
  for i, spec in enumerate(raw):
    spec = dict(spec)
    unknown = sorted(set(spec) - set(STAGE_KEYS))
    if unknown:
      raise ValueError(f"stages[{i}] has unknown keys {unknown}; valid keys: {list(STAGE_KEYS)}")
    if "seq_len" not in spec:
      raise ValueError(f"stages[{i}] needs seq_len")
    seq_len = int(spec["seq_len"])
    batch = int(spec.get("batch_size") or tokens_per_batch // seq_len)
    if batch < 1 or (not spec.get("batch_size") and tokens_per_batch % seq_len):
      raise ValueError(f"stages[{i}].seq_len={seq_len} does not divide the global batch of "
                       f"{tokens_per_batch} tokens (data.batch_size * data.seq_len); set "
                       f"stages[{i}].batch_size")
    if ("steps" in spec) == ("tokens" in spec):
      raise ValueError(f"stages[{i}] needs exactly one of steps, tokens")
    steps = int(spec["steps"]) if "steps" in spec else int(spec["tokens"]) // (batch * seq_len)
    if steps < 1:
      raise ValueError(f"stages[{i}] is shorter than one step ({spec})")
    overrides = {k: spec[k] for k in POSITIONAL_KEYS if k in spec}
    stages.append(Stage(i, seq_len, batch, steps, first, overrides))
    first += steps
  return stages


def total_steps(stages: list[Stage]) -> int:
  return stages[-1].last_step


def stage_of(stages: list[Stage], step: int) -> Stage:
  """The stage a (1-based) global step belongs to."""
  for stage in stages:
    if step <= stage.last_step:
      return stage
  return stages[-1]
