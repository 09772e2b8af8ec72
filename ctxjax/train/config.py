"""The trainer's config sections as typed, frozen dataclasses, validated ONCE from the
ml_collections ConfigDict a recipe (configs/*.py) returns: `run_config(config)` -> RunConfig
(data, train, optim, mesh, stages, aot, eval; `model` stays the mapping model_config_from_dict
validates per stage). Parsing, defaults and error wording: ctxjax/data/settings.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ctxjax.data.config import DataConfig, data_config
from ctxjax.data.settings import (choice, from_mapping, nonnegative, positive, setting,
                                  unknown_key)
from ctxjax.registry import unknown_choice

SCHEDULES = ("cosine", "constant", "linear")  # ctxjax/train/optim.py


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """`config.train`: the step loop, evaluation, checkpoints and where parameters start."""
  steps: int = setting(kind=int, check=positive)
  log_every: int = setting(kind=int, check=positive)
  eval_batches: int = setting(kind=int, check=nonnegative)
  seed: int = setting(kind=int)
  save_every: int = setting(0, kind=int, check=nonnegative)   # 0 = no checkpoints
  # the newest this many are kept; >= 1 (save_every=0 is the one way to have no checkpoints)
  keep_checkpoints: int = setting(3, kind=int, check=positive)
  async_checkpoints: bool = setting(True, kind=bool)
  grad_accum_steps: int = setting(1, kind=int, check=positive)  # micro-batches per step
  init_from: str = setting("", kind=str)      # ctxjax/train/init_from.py
  init_from_hf: str = setting("", kind=str)


def _positive_number(path: str, value) -> None:
  if not value > 0:
    raise ValueError(f"{path} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  """`config.optim`: AdamW, its schedule and which parameters train (ctxjax/train/optim.py)."""
  learning_rate: float = setting(kind=float, check=_positive_number)
  warmup_steps: int = setting(kind=int, check=nonnegative)
  schedule: str = setting(kind=str, check=choice(*SCHEDULES))
  min_lr_ratio: float = setting(0.1, kind=float)
  weight_decay: float = setting(kind=float)
  b1: float = setting(kind=float)
  b2: float = setting(kind=float)
  eps: float = setting(1e-8, kind=float)
  grad_clip_norm: float = setting(kind=float)
  trainable: tuple = setting((), kind=tuple, optional=True)  # regexes; () = every parameter


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """`config.mesh`: per-axis device counts within (ici) and across (dcn) slices, -1 = the
  rest, and optional logical-axis rules (ctxjax/train/sharding.py checks both)."""
  ici_data: int = setting(-1, kind=int)
  ici_fsdp: int = setting(1, kind=int)
  ici_context: int = setting(1, kind=int)
  ici_tensor: int = setting(1, kind=int)
  dcn_data: int = setting(1, kind=int)
  dcn_fsdp: int = setting(1, kind=int)
  dcn_context: int = setting(1, kind=int)
  dcn_tensor: int = setting(1, kind=int)
  logical_axis_rules: Any = setting(None, kind=None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageSpec:
  """One entry of `config.stages` (ctxjax/train/stages.py resolves batch and steps)."""
  seq_len: int = setting(kind=int, check=positive)
  steps: int | None = setting(None, kind=int, optional=True)
  tokens: int | None = setting(None, kind=int, optional=True)
  batch_size: int | None = setting(None, kind=int, optional=True)
  # Positional changes of the stage (model config overrides):
  rope_theta: float | None = setting(None, kind=float, optional=True)
  rope_scaling: dict | None = setting(None, kind=dict, optional=True)
  max_position_embeddings: int | None = setting(None, kind=int, optional=True, check=positive)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AotConfig:
  """`config.aot`: the recipe's own ahead-of-time target (ctxjax/aot.py); one of the two."""
  topology: str | None = setting(None, kind=str, optional=True)
  devices: str | None = setting(None, kind=str, optional=True)


# The tasks `config.eval` may run (ctxjax/eval/during_training.py runs them; `compress` of
# `python -m ctxjax.evaluate` needs a second model and is left out).
EVAL_TASKS = ("ppl", "passkey", "needle", "ruler")


def _eval_tasks(path: str, value) -> None:
  if not value:
    raise ValueError(f"{path} is empty; valid choices: {list(EVAL_TASKS)}")
  for name in value:
    if name not in EVAL_TASKS:
      raise ValueError(unknown_choice(path, name, EVAL_TASKS))


def _positive_ints(path: str, value) -> None:
  if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
    raise ValueError(f"{path} must be a list of positive integers, got {list(value)!r}")


def _fractions(path: str, value) -> None:
  if any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1
         for d in value):
    raise ValueError(f"{path} must be fractions in [0, 1], got {list(value)!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """`config.eval`: the tasks of `python -m ctxjax.evaluate` run during training, every
  `every` steps and after the last one; their scores go to metrics.jsonl and TensorBoard as
  eval/<task>@<length> (ctxjax/eval/during_training.py). Absent or every=0: none."""
  every: int = setting(0, kind=int, check=nonnegative)    # steps between evaluations; 0 = off
  tasks: tuple = setting(("ppl", "passkey"), kind=tuple, check=_eval_tasks)
  lengths: tuple = setting((), kind=tuple, check=_positive_ints)  # () = seq_len and 2x seq_len
  depths: tuple = setting((0.0, 0.5, 1.0), kind=tuple, check=_fractions)  # needle depths
  samples: int = setting(1, kind=int, check=positive)     # prompts per (length, depth) cell
  max_tokens: int = setting(4096, kind=int, check=positive)  # ppl: tokens per source, length
  seed: int = setting(0, kind=int)                        # of the synthetic prompts


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: Any                 # config.model as given; model_config_from_dict validates it
  data: DataConfig
  train: TrainConfig
  optim: OptimConfig
  mesh: MeshConfig
  stages: tuple[StageSpec, ...]
  aot: AotConfig
  eval: EvalConfig


def stage_specs(raw) -> tuple[StageSpec, ...]:
  return tuple(from_mapping(StageSpec, spec, f"stages[{i}]") for i, spec in enumerate(raw or ()))


_SECTIONS = ("model", "data", "train", "optim", "mesh", "stages", "aot", "eval")


def run_config(config) -> RunConfig:
  """Every section of `config` (a ConfigDict or dict) validated; errors name the key."""
  if isinstance(config, RunConfig):
    return config
  for key in config.keys():
    if key not in _SECTIONS:
      raise ValueError(unknown_key("", key, _SECTIONS))
  for key in ("model", "data", "train", "optim"):
    if key not in config:
      raise ValueError(f"config.{key} is required")
  get = lambda key: config[key] if key in config else None
  return RunConfig(model=config["model"], data=data_config(config["data"]),
                   train=from_mapping(TrainConfig, config["train"], "train"),
                   optim=from_mapping(OptimConfig, config["optim"], "optim"),
                   mesh=from_mapping(MeshConfig, get("mesh"), "mesh"),
                   stages=stage_specs(get("stages")),
                   aot=from_mapping(AotConfig, get("aot"), "aot"),
                   eval=from_mapping(EvalConfig, get("eval"), "eval"))

