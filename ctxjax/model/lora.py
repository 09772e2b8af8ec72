"""LoRA adapters on one projection (Hu et al. 2021): the spec, the parameters, the dropout.

  y = x W + (lora_alpha / lora_rank) * dropout(x) A B

A [in..., r] starts as PEFT's kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)); B [r, out...]
starts at zero, so a fresh adapter leaves the model exactly unchanged. A and B sit beside the
kernel (`lora_a`, `lora_b`), named with the kernel's logical axes (the rank axis is replicated),
so they shard with the rules that shard the kernel. Dropout hits the adapter input only, and
only when training (PEFT).

LongLoRA (Chen et al. 2024, fine-tune.py): r 8, alpha 16, dropout 0 on q,k,v,o, with the
embeddings and norms also trained (optim.trainable, ctxjax/train/trainable.py) and S2-Attn.
LongQLoRA (Yang 2023): LoRA on every block projection over a frozen NF4 base (quant.py).

This module holds what one `Projection` needs (layers.py); operations on whole parameter trees
(merging adapters away, fresh adapters on a base) are in params.py. It imports nothing of
ctxjax.model, so config.py and layers.py may both use it.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctxjax.registry import unknown_choice

# Every dense matmul inside a decoder block (layers.py); lm_head stays a plain kernel, as in
# PEFT's and bitsandbytes' defaults.
BLOCK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj")
ADAPTER_PARAMS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """The adapter one projection carries: rank r, scale alpha / r, input dropout rate."""
  rank: int
  alpha: float
  dropout: float = 0.0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def spec(cfg, name: str) -> LoraSpec | None:
  """The adapter of the block projection `name` under a model config (None: no adapter)."""
  if cfg.lora_rank > 0 and name in cfg.lora_targets:
    return LoraSpec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
  return None


def validate(merged: dict) -> None:
  """Check the lora_* keys of a model-config dict in place (lora_targets becomes a tuple)."""
  rank = merged["lora_rank"]
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise ValueError(f"model.lora_rank must be an integer >= 0 (0 = no LoRA), got {rank!r}")
  alpha = merged["lora_alpha"]
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"model.lora_alpha must be a number > 0, got {alpha!r}")
  dropout = merged["lora_dropout"]
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise ValueError(f"model.lora_dropout must lie in [0, 1), got {dropout!r}")
  targets = merged["lora_targets"]
  if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
    raise ValueError(f"{unknown_choice('model.lora_targets', targets, BLOCK_PROJECTIONS)} "
                     "(a list of projection names)")
  unknown = [t for t in targets if t not in BLOCK_PROJECTIONS]
  if unknown or len(set(targets)) != len(targets) or (rank and not targets):
    raise ValueError(f"{unknown_choice('model.lora_targets', list(targets), BLOCK_PROJECTIONS)}"
                     f" (each one of these, without repeats, and at least one when "
                     f"lora_rank > 0; unknown: {unknown})")
  merged["lora_alpha"], merged["lora_dropout"] = float(alpha), float(dropout)
  merged["lora_targets"] = tuple(t for t in BLOCK_PROJECTIONS if t in targets)  # canonical order


def a_init(n_in: int):
  """PEFT's kaiming_uniform_(a=sqrt(5)) on torch's [r, in] lora_A: bound sqrt(6 / ((1 + 5) *
  fan_in)) = 1/sqrt(fan_in); here A is [in..., r], fan_in = prod(in...)."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                          in_axis=tuple(range(n_in)), out_axis=-1)


def adapter(module: nn.Module, rank: int, kernel_shape: tuple, names: tuple, n_in: int,
            dtype) -> tuple[jax.Array, jax.Array]:
  """(lora_a [in..., r], lora_b [r, out...]) as parameters of `module` (created on init)."""
  a = module.param("lora_a", nn.with_logical_partitioning(a_init(n_in), (*names[:n_in], None)),
                   (*kernel_shape[:n_in], rank), dtype)
  b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (None, *names[n_in:])),
                   (rank, *kernel_shape[n_in:]), dtype)
  return a, b


def dropout(module: nn.Module, x, rate: float, training: bool):
  """Inverted dropout of the adapter input at `rate` (model.lora_dropout), training only."""
  if not training or rate == 0:
    return x
  if not module.has_rng("dropout"):
    raise ValueError(f"model.lora_dropout={rate} needs a 'dropout' PRNG key when training: "
                     "model.apply(..., train=True, rngs={'dropout': key})")
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
