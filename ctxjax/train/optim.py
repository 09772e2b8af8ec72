"""AdamW with warmup + cosine/constant/linear decay and global-norm clipping (optax), applied to
the parameters `optim.trainable` selects (all by default; ctxjax/train/trainable.py)."""
from __future__ import annotations

import jax.numpy as jnp
import optax

from ctxjax.train.trainable import only_trainable

SCHEDULES = ("cosine", "constant", "linear")


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then decay to `learning_rate * min_lr_ratio`."""
  peak = float(optim_cfg.learning_rate)
  warmup = int(optim_cfg.warmup_steps)
  kind = optim_cfg.schedule
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r}; valid choices: {list(SCHEDULES)}")
  if peak <= 0:
    raise ValueError(f"optim.learning_rate must be > 0, got {peak}")
  if not 0 <= warmup <= total_steps:
    raise ValueError(f"optim.warmup_steps must lie in [0, total steps={total_steps}], got {warmup}")
  floor = peak * float(optim_cfg.get("min_lr_ratio", 0.1))
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


def make_optimizer(optim_cfg, total_steps: int):
  """(tx, schedule). `optim.trainable` (regexes, e.g. LongLoRA's ["lora_", "embed_tokens",
  "norm"]) restricts training to the matching parameters: the others get no optimizer state,
  and gradient clipping sees only the trainable gradients."""
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(float(optim_cfg.grad_clip_norm)),
      optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                  eps=float(optim_cfg.get("eps", 1e-8)),
                  weight_decay=float(optim_cfg.weight_decay), mask=_decay_mask),
  )
  return only_trainable(tx, list(optim_cfg.get("trainable", None) or ())), schedule
