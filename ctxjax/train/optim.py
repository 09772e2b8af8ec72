"""AdamW with warmup + cosine/constant/linear decay and global-norm clipping (optax), applied to
the parameters `optim.trainable` selects (all by default; ctxjax/train/trainable.py)."""
from __future__ import annotations

import jax.numpy as jnp
import optax
from absl import logging

from ctxjax.data.settings import coerce
from ctxjax.train.config import OptimConfig
from ctxjax.train.trainable import only_trainable


def learning_rate_schedule(optim_cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then decay to `learning_rate * min_lr_ratio`. A warmup
  longer than the run is clamped to the run (a recipe's warmup must not stop a short run,
  e.g. a smoke test with train.steps=20 of a recipe warming up over 30)."""
  optim_cfg = coerce(OptimConfig, optim_cfg, "optim")
  peak, warmup, kind = optim_cfg.learning_rate, optim_cfg.warmup_steps, optim_cfg.schedule
  if warmup < 0:
    raise ValueError(f"optim.warmup_steps must be a non-negative integer, got {warmup}")
  if warmup > total_steps:
    logging.warning("optim.warmup_steps=%d is more than the run's %d steps: warming up over "
                    "all %d (set optim.warmup_steps to at most %d to choose)", warmup,
                    total_steps, total_steps, total_steps)
    warmup = total_steps
  floor = peak * optim_cfg.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=floor / peak)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, floor, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  warm = optax.linear_schedule(peak / max(warmup, 1), peak, max(warmup - 1, 1))
  return optax.join_schedules([warm, decay], [warmup]) if warmup else decay


def _decay_mask(params):
  """Weight decay on matrices only (not norms' scales), as LLaMA/MaxText."""
  import jax
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(optim_cfg: OptimConfig, total_steps: int):
  """(tx, schedule). `optim.trainable` (regexes, e.g. LongLoRA's ["lora_", "embed_tokens",
  "norm"]) restricts training to the matching parameters: the others get no optimizer state,
  and gradient clipping sees only the trainable gradients."""
  optim_cfg = coerce(OptimConfig, optim_cfg, "optim")  # or (library use) a mapping
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip_norm),
      optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay, mask=_decay_mask),
  )
  return only_trainable(tx, list(optim_cfg.trainable or ())), schedule
