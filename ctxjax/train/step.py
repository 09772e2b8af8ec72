"""Train state, loss and the jitted train/eval steps."""
from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ctxjax.positions import generators

POSITION_IDS = ("data", "randomized", "pose")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def cross_entropy(logits_BTV, targets_BT, loss_mask_BT):
  """Mean token NLL in float32 over unmasked targets; also returns the token count."""
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), targets_BT)
  weight = loss_mask_BT.astype(jnp.float32)
  tokens = jnp.sum(weight)
  return jnp.sum(nll_BT * weight) / jnp.maximum(tokens, 1.0), tokens


def training_positions(data_cfg, rng, positions_BT):
  """Position ids a training batch uses: the packed ones, or a training-time generator
  (randomized positional encodings, Ruoss et al. 2023; PoSE, Zhu et al. 2024)."""
  kind = data_cfg.get("position_ids", "data")
  batch, length = positions_BT.shape
  if kind == "data":
    return positions_BT
  if kind == "randomized":
    return generators.randomized_positions(rng, batch, length, int(data_cfg.max_position_id))
  if kind == "pose":
    return generators.pose_positions(rng, batch, length, int(data_cfg.max_position_id))
  raise ValueError(f"data.position_ids={kind!r}; valid choices: {list(POSITION_IDS)}")


def init_state(model: nn.Module, tx, rng, batch_size: int, seq_len: int) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
  positions = generators.contiguous_positions(batch_size, seq_len)
  variables = jax.jit(model.init)(init_rng, tokens, positions, jnp.ones_like(tokens))
  params = nn.meta.unbox(variables["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)


def make_train_step(model: nn.Module, tx, data_cfg):
  """(state, batch) -> (state, metrics); batch: inputs/targets/positions/segment_ids/loss_mask."""

  def loss_fn(params, batch, rng):
    positions = training_positions(data_cfg, rng, batch["positions"])
    logits = model.apply({"params": params}, batch["inputs"], positions, batch["segment_ids"])
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": optax.global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: nn.Module):
  @jax.jit
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"],
                         batch["segment_ids"])
    loss, tokens = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return loss * tokens, tokens
  return eval_step
