"""Progressive training as data: a list of stages (GrowLength, Jin et al. 2023; LWM-style
rope_theta increases), each with its sequence length, length in steps or tokens, batch and
optional positional changes. One run walks the stages, recompiling once per stage, under one
continuous learning-rate schedule; a resumed run re-enters the stage its step belongs to.

  config.stages = [dict(seq_len=64, tokens=262144),
                   dict(seq_len=128, tokens=262144, rope_theta=5e4), ...]

By default the global batch in TOKENS stays constant (`data.batch_size * data.seq_len`), so
the batch halves when the length doubles (MaxText #801's lesson). Without `config.stages`, the run is one stage of data.seq_len x train.steps.
"""
from __future__ import annotations

import dataclasses

from ctxjax.train.config import run_config

POSITIONAL_KEYS = ("rope_theta", "rope_scaling", "max_position_embeddings")  # StageSpec fields


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
  """The stages of `config` (a RunConfig, or a ConfigDict validated here: ctxjax/train/
  config.py) with their batch, steps and first step."""
  run = run_config(config)
  data = run.data
  if not run.stages:
    return [Stage(0, data.seq_len, data.batch_size, run.train.steps, 1, {})]
  tokens_per_batch = data.batch_size * data.seq_len
  stages, first = [], 1
  for i, spec in enumerate(run.stages):
    seq_len = spec.seq_len
    batch = spec.batch_size or tokens_per_batch // seq_len
    if batch < 1 or (not spec.batch_size and tokens_per_batch % seq_len):
      raise ValueError(f"stages[{i}].seq_len={seq_len} does not divide the global batch of "
                       f"{tokens_per_batch} tokens (data.batch_size * data.seq_len); set "
                       f"stages[{i}].batch_size")
    if (spec.steps is None) == (spec.tokens is None):
      raise ValueError(f"stages[{i}] needs exactly one of steps, tokens")
    steps = spec.steps if spec.steps is not None else spec.tokens // (batch * seq_len)
    if steps < 1:
      raise ValueError(f"stages[{i}] is shorter than one step ({spec})")
    overrides = {k: getattr(spec, k) for k in POSITIONAL_KEYS if getattr(spec, k) is not None}
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


def stage_model_config(model, stage: Stage):
  """The model of one stage: `config.model` (a mapping) with the stage's positional
  overrides, validated."""
  from ctxjax.model import model_config_from_dict
  merged = dict(model.to_dict() if hasattr(model, "to_dict") else model)
  merged.update(stage.model_overrides)
  return model_config_from_dict(merged)
