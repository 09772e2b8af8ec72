"""Train state, loss and the jitted train/eval steps."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ctxjax import xla_options
from ctxjax.data.config import POSITION_IDS, DataConfig
from ctxjax.data.settings import coerce
from ctxjax.positions import generators
from ctxjax.registry import unknown_choice
from ctxjax.train import trainable as trainable_lib



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


def vouches_for_positions(data_cfg: DataConfig) -> bool:
  """Whether the train step promises the model contiguous positions (they step by 1 within each
  segment, as packing makes them): for packed data, never for PoSE / randomized ids. Kernels
  that use the promise (`auto`'s splash on TPU) check it on the device."""
  return data_cfg.position_ids == "data"


def training_positions(data_cfg: DataConfig, rng, positions_BT):
  """Position ids a training batch uses: the packed ones, or a training-time generator
  (randomized positional encodings, Ruoss et al. 2023; PoSE, Zhu et al. 2024)."""
  kind = data_cfg.position_ids
  batch, length = positions_BT.shape
  if kind == "data":
    return positions_BT
  if kind == "randomized":
    return generators.randomized_positions(rng, batch, length, data_cfg.max_position_id)
  if kind == "pose":
    return generators.pose_positions(rng, batch, length, data_cfg.max_position_id)
  raise ValueError(unknown_choice("data.position_ids", kind, POSITION_IDS))


def _boxed_state(model: nn.Module, tx, rng, batch_size: int, seq_len: int) -> TrainState:
  """The initial state with parameters (and, through optax, optimizer moments) still boxed in
  their logical-axis metadata."""
  init_rng, state_rng = jax.random.split(rng)
  tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
  positions = generators.contiguous_positions(batch_size, seq_len)
  params = model.init(init_rng, tokens, positions, jnp.ones_like(tokens))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)


def init_state(model: nn.Module, tx, rng, batch_size: int, seq_len: int, *, mesh=None,
               rules=None):
  """(state, state_shardings). Without a mesh: one device, shardings None. With one: every
  parameter and optimizer moment is created directly in its sharding (never whole on a host)."""
  init = lambda r: nn.meta.unbox(_boxed_state(model, tx, r, batch_size, seq_len))
  if mesh is None:
    return xla_options.jit(init)(rng), None
  _, shardings = abstract_train_state(model, tx, batch_size, seq_len, mesh=mesh, rules=rules)
  # out_shardings places the state; the abstract mesh lets context-parallel kernels (ring)
  # trace their shard_map during init.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    state = xla_options.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def abstract_train_state(model: nn.Module, tx, batch_size: int, seq_len: int, *, mesh, rules):
  """(ShapeDtypeStruct tree carrying each leaf's sharding, state_shardings), allocating nothing:
  what AOT compilation (ctxjax/aot.py) and checkpoint restores need."""
  from ctxjax.train import sharding
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)  # no eager PRNGKey: mesh devices may be remote
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    boxed = jax.eval_shape(lambda r: _boxed_state(model, tx, r, batch_size, seq_len), rng)
  sharding.check_params_covered(boxed.params, rules)
  shardings = sharding.logical_to_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def _micro_batches(batch, steps: int):
  """[B, ...] -> [steps, B/steps, ...], micro-batch i holding rows i, i+steps, i+2*steps, ...:
  each device's contiguous block of rows splits evenly across micro-batches, so the split
  moves no data between devices."""
  def split(x):
    if x.shape[0] % steps:
      raise ValueError(f"batch of {x.shape[0]} rows is not divisible by "
                       f"train.grad_accum_steps={steps}")
    return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def global_norm(tree) -> jax.Array:
  """sqrt(sum of squares) over every leaf, as optax.global_norm (deprecated in optax 0.2.5 for
  optax.tree.norm, which older optax releases in this project's range lack)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def make_train_step(model: nn.Module, tx, data_cfg: DataConfig, *, mesh=None, rules=None,
                    state_shardings=None, grad_accum_steps: int = 1, trainable=None,
                    compiler_options: dict | None | str = "platform"):
  """(state, batch) -> (state, metrics); batch: inputs/targets/positions/segment_ids/loss_mask,
  the global batch of one optimizer step. With `grad_accum_steps` > 1 it runs as that many
  micro-batches whose summed gradients give exactly the full batch's token-mean loss.
  With a mesh, the step is jit with explicit in/out shardings (pjit semantics) and runs under
  the mesh and logical-axis rules, so the model's activation constraints take effect; the
  returned function also has `.lower(state, batch)` for AOT compilation. `trainable`
  (optim.trainable's regexes) differentiates only those parameters: frozen ones — a LoRA base,
  LongQLoRA's integer codes — get zero gradients and no backward matmuls for their weights.
  `compiler_options`: "platform" = ctxjax's options for the mesh's platform (ctxjax/xla_options.py),
  else passed to jax.jit as they are (None = XLA's defaults; benchmarks/xla_options.py)."""
  if int(grad_accum_steps) < 1:
    raise ValueError(f"train.grad_accum_steps must be >= 1, got {grad_accum_steps}")
  data_cfg = coerce(DataConfig, data_cfg, "data")  # a DataConfig, or (library use) a mapping

  vouched = vouches_for_positions(data_cfg)

  def nll_sum_fn(params, batch, rng):
    positions = training_positions(data_cfg, rng, batch["positions"])
    logits = model.apply({"params": params}, batch["inputs"], positions, batch["segment_ids"],
                         train=True, positions_contiguous=vouched,
                         rngs={"dropout": jax.random.fold_in(rng, 1)})
    loss, tokens = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return loss * tokens, tokens

  def gradients(params, batch, rng):
    """(token-mean loss, tokens, grads of the token-mean loss) over the whole batch."""
    if trainable:
      mask = trainable_lib.trainable_mask(params, list(trainable))
      grad_fn = trainable_lib.value_and_grad(nll_sum_fn, mask, has_aux=True)
    else:
      grad_fn = jax.value_and_grad(nll_sum_fn, has_aux=True)
    if grad_accum_steps == 1:
      (nll, tokens), grads = grad_fn(params, batch, rng)
    else:
      def micro(carry, xs):
        nll_acc, tokens_acc, grads_acc = carry
        micro_batch, i = xs
        (nll, tokens), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, i))
        return (nll_acc + nll, tokens_acc + tokens,
                jax.tree.map(jnp.add, grads_acc, grads)), None
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
      xs = (_micro_batches(batch, grad_accum_steps), jnp.arange(grad_accum_steps))
      (nll, tokens, grads), _ = jax.lax.scan(micro, init, xs)
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    scale = 1.0 / jnp.maximum(tokens, 1.0)
    return nll * scale, tokens, jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, tokens, grads = gradients(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  options = (xla_options.platform_options(mesh) if compiler_options == "platform"
             else compiler_options)
  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,), compiler_options=options)
  from ctxjax.train import sharding
  batch_shard = sharding.batch_sharding(mesh, rules)
  jitted = jax.jit(train_step, donate_argnums=(0,),
                   in_shardings=(state_shardings, batch_shard),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   compiler_options=options)

  def sharded_step(state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, batch)

  def lower(state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted.lower(state, batch)
  sharded_step.lower = lower
  return sharded_step


def make_eval_step(model: nn.Module):
  @xla_options.jit
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"],
                         batch["segment_ids"])
    loss, tokens = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return loss * tokens, tokens
  return eval_step
