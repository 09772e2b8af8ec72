"""Orbax checkpoints of the whole training state: parameters, optimizer state, step, RNG, the
data iterator's position, and the model config as metadata.

Saves are asynchronous and atomic (orbax writes into a temporary directory and renames it when
complete, so a half-written checkpoint is never picked up), every `save_every` steps and on
SIGTERM/SIGINT (preemption). `--workdir` resumes automatically from the newest checkpoint.
Restoring into a model whose config differs stops with the differing keys.
"""
from __future__ import annotations

import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from ctxjax.model.quant import ABSMAX  # the marker of a quantized projection

# Keys whose change makes a checkpoint's parameters mean something else (or not fit).
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "tie_word_embeddings", "position_embedding_type", "scan_layers",
                     "max_position_embeddings_if_learned", "lora_rank", "lora_targets",
                     "base_quantization", "quant_block_size")


def architecture(model_config: dict) -> dict:
  out = {k: model_config.get(k) for k in ARCHITECTURE_KEYS if k in model_config}
  if model_config.get("position_embedding_type") == "learned":
    out["max_position_embeddings_if_learned"] = model_config.get("max_position_embeddings")
  return out


def config_differences(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
  """Architecture keys whose values differ, as 'key: saved -> current' (keys one side does not
  record, e.g. from before LoRA existed, and `ignore`d keys are not compared)."""
  a, b = architecture(saved), architecture(current)
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) & set(b))
          if k not in ignore and a.get(k) != b.get(k)]


class Checkpointer:
  """Thin policy layer over ocp.CheckpointManager for the trainer."""

  def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep), create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._preempted = False
    self._previous_handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
      except ValueError:  # not the main thread (e.g. inside some test runners)
        pass

  def _on_signal(self, signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint at the end of this step, then stopping",
                    signum)
    self._preempted = True

  @property
  def preempted(self) -> bool:
    return self._preempted

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, *, data_state: dict, meta: dict, force: bool = False):
    if not force and (step % self.save_every):
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    return self._manager.save(step, args=args, force=force)

  def restore(self, abstract_state, *, model_config: dict, step: int | None = None
              ) -> tuple[Any, dict, dict]:
    """(state, data_state, meta) of `step` (default: newest). Checks the model config first."""
    step = self._manager.latest_step() if step is None else step
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = dict(meta["meta"])
    diffs = config_differences(meta.get("model_config", {}), model_config)
    if diffs:
      raise ValueError(f"the checkpoint in {self.directory} (step {step}) belongs to a "
                       f"different model; differing model config keys: {'; '.join(diffs)}. "
                       f"Use another --workdir, or config.train.init_from for a params-only load.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"]), meta

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
    for sig, handler in self._previous_handlers.items():
      signal.signal(sig, handler)


def abstract_like(state, shardings=None):
  """ShapeDtypeStructs (with shardings) that tell orbax where to put restored arrays."""
  if shardings is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _flat(tree, prefix=()) -> dict[tuple, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _unflat(flat: dict[tuple, Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return out


def restore_params(workdir: str, abstract_params, *, model_config: dict, step: int | None = None,
                   quantize_on_load=None) -> tuple[dict, list[str], int]:
  """Parameters only, from another ctxjax training run's newest (or `step`) checkpoint — the
  `config.train.init_from` of continual pretraining: the optimizer, step, RNG and data state
  start fresh. Each restored array lands directly in its sharding from `abstract_params`.

  Returns (restored params, the '/'-paths of `abstract_params` the checkpoint lacks — e.g. new
  LoRA adapters, left to the caller's initialisation — and the step read). A differing
  architecture, or a checkpoint tensor whose shape differs, is an error naming it.
  quantize_on_load('/'-path, float kernel) -> {'/'-path: array}: for a float checkpoint under a
  model with a quantized base (LongQLoRA), each float kernel is restored alone (replicated),
  turned into the model's codes + absmax and placed in their shardings."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(directory, item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"config.train.init_from={workdir!r}: no checkpoint under {directory}")
  meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
  # New LoRA adapters on a plain checkpoint are LongLoRA's start: they keep their init; a float
  # checkpoint under a quantized base is LongQLoRA's (its kernels are quantized on load).
  diffs = config_differences(meta.get("model_config", {}), model_config,
                             ignore=("lora_rank", "lora_targets", "base_quantization",
                                     "quant_block_size"))
  if diffs:
    raise ValueError(f"config.train.init_from={workdir!r} (step {step}) holds a different "
                     f"model; differing model config keys: {'; '.join(diffs)}")
  saved = _flat(manager.item_metadata(step)["state"].tree["params"])
  wanted = _flat(abstract_params)
  # Float kernels of projections this model stores quantized: restored one at a time by
  # `quantize_on_load` (codes + absmax) after the rest.
  to_quantize = {p: have for p, have in saved.items()
                 if quantize_on_load is not None and p not in wanted and p[-1] == "kernel" and
                 p[:-1] + (ABSMAX,) in wanted}
  saved = {p: have for p, have in saved.items() if p not in to_quantize}
  for path, have in saved.items():
    if path in wanted and tuple(have.shape) != tuple(wanted[path].shape):
      raise ValueError(f"config.train.init_from: parameter {'/'.join(path)} has shape "
                       f"{tuple(have.shape)} in the checkpoint, {tuple(wanted[path].shape)} here")
  unused = sorted("/".join(p) for p in saved if p not in wanted)
  if unused:
    raise ValueError(f"config.train.init_from={workdir!r}: checkpoint parameters this model "
                     f"has no place for: {unused[:8]}")
  present = _unflat({p: a for p, a in wanted.items() if p in saved})
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), present)
  restore = lambda tree, args: manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item={"params": tree}, restore_args={"params": args},
                                   partial_restore=True)))["state"]["params"]
  restored = _flat(restore(present, restore_args))
  for path, have in sorted(to_quantize.items()):
    mesh = wanted[path[:-1] + (ABSMAX,)].sharding.mesh
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    leaf = _unflat({path: jax.ShapeDtypeStruct(have.shape, have.dtype, sharding=whole)})
    kernel = _flat(restore(leaf, _unflat({path: ocp.ArrayRestoreArgs(sharding=whole)})))[path]
    for sub, value in quantize_on_load("/".join(path), kernel).items():
      sub = tuple(sub.split("/"))
      restored[sub] = jax.device_put(value, wanted[sub].sharding)
  manager.close()
  missing = sorted("/".join(p) for p in wanted if p not in restored)
  return _unflat(restored), missing, step
