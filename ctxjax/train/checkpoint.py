"""Orbax checkpoints of the whole training state: parameters, optimizer state, step, RNG, the
data iterator's position, and the model config as metadata.

Saves are asynchronous and atomic (orbax writes into a temporary directory and renames it when
complete, so a half-written checkpoint is never picked up), every `save_every` steps and on
SIGTERM/SIGINT (preemption). `--workdir` resumes automatically from the newest checkpoint.
Restoring into a model whose config differs stops with the differing keys.

Faults (ctxjax/train/checkpoint_faults.py): the directory is checked writable before step 1; a
save failing in the background stops the run at the next step, in seconds and one line. A
damaged newest checkpoint falls back to the newest older one that restores; the damaged ones are
then moved aside to `<step>.corrupt` (never deleted), one line each saying why. When none
restores, nothing is moved (an optimizer change makes every checkpoint fail alike: not damage).
"""
from __future__ import annotations

import logging as std_logging
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ctxjax import storage
from ctxjax.model.params import flatten
from ctxjax.train import checkpoint_faults as faults

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


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints: absolute when local, as given when remote (gs://: orbax writes there
  through tensorstore)."""
  return storage.join(storage.resolve(workdir), "checkpoints")


class Checkpointer:
  """Thin policy layer over ocp.CheckpointManager for the trainer."""

  def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    self.save_every = int(save_every)
    faults.check_writable(self.directory)
    self._log_filter = faults.OrbaxErrorsOneLine()
    std_logging.getLogger("absl").addFilter(self._log_filter)
    faults.quiet_orbax_tasks()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep), create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._preempted, self._abandoned = False, False
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
    try:
      self._manager.check_for_errors()  # the last background save: cheap, every step
      if not force and (step % self.save_every):
        return False
      args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_state),
                                meta=ocp.args.JsonSave(meta))
      return self._manager.save(step, args=args, force=force)
    except Exception as err:  # noqa: BLE001
      raise self._failed(err) from None

  def _failed(self, err: BaseException) -> OSError:
    """A failed save as one line; the manager is abandoned (closing it would wait on orbax's
    barriers and timeouts for the save that can never finish)."""
    self._abandoned = self._log_filter.reported = True
    faults.release_orbax_waiters()
    faults.drain()
    return faults.save_error(self.directory, err)

  def restore(self, abstract_state, *, model_config: dict, step: int | None = None
              ) -> tuple[Any, dict, dict]:
    """(state, data_state, meta) of `step` (default: the newest that restores, damaged newer
    ones moved aside; see the module doc). Checks the model config first."""

    def read(step):
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = dict(meta["meta"])
      diffs = config_differences(meta.get("model_config", {}), model_config)
      if diffs:
        raise faults.ModelMismatch(
            f"the checkpoint in {self.directory} (step {step}) belongs to a different model; "
            f"differing model config keys: {'; '.join(diffs)}. Use another --workdir, or "
            f"config.train.init_from for a params-only load.")
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      return restored["state"], dict(restored["data"]), meta

    if step is not None:
      return faults.read_step(read, step, self.directory, "step")
    result, step, damaged = faults.newest_restorable(self._manager.all_steps(), read,
                                                     self.directory)
    for bad, reason in damaged:
      where = self._move_aside(bad) if jax.process_index() == 0 else "left for process 0"
      logging.warning("checkpoint step %d is damaged (%s): %s; resuming from step %d", bad,
                      reason, where, step)
    if damaged:
      self._manager.reload()
    return result

  def _move_aside(self, step: int) -> str:
    """Renames <step>/ to <step>.corrupt/ (orbax ignores the name): kept for inspection, and
    the resumed run can write <step>/ again."""
    src = epath.Path(self.directory) / str(step)
    dst = src.parent / f"{step}.corrupt"
    n = 1
    while dst.exists():
      dst, n = src.parent / f"{step}.corrupt.{n}", n + 1
    src.rename(dst)
    return f"moved aside to {dst}"

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    try:
      if not self._abandoned:
        try:
          self._manager.wait_until_finished()
          self._manager.check_for_errors()
        except Exception as err:  # noqa: BLE001
          raise self._failed(err) from None
        self._manager.close()
        # an abandoned save's threads still log while they end: the filter stays for them
        std_logging.getLogger("absl").removeFilter(self._log_filter)
    finally:
      for sig, handler in self._previous_handlers.items():
        signal.signal(sig, handler)


def abstract_like(state, shardings=None):
  """ShapeDtypeStructs (with shardings) that tell orbax where to put restored arrays."""
  if shardings is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _host_restore_args(tree):
  """orbax restore args that read every leaf of `tree` into a host numpy array."""
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def read_params(directory: str, step: int | None = None, *, step_flag: str = "step"
                ) -> tuple[dict[str, np.ndarray], dict, int]:
  """(state.params as {'/'-path: host numpy array}, meta, step) of the checkpoint of `step`
  (default: the newest that restores; a damaged newer one is named in a warning and left in
  place: readers never change a workdir) under `directory` (a run's WORKDIR/checkpoints).
  Parameters only: the optimizer state, step, RNG and data state are not read.
  ctxjax.model.param_loader checks and places them (the one way parameters enter a model).
  `step_flag` names the setting that chose `step` in the error for a step the directory lacks
  or that does not restore."""
  faults.quiet_orbax_tasks()
  manager = ocp.CheckpointManager(directory, item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def read(step):
    meta = dict(manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"])
    tree = manager.item_metadata(step)["state"].tree["params"]
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": tree}, restore_args={"params": _host_restore_args(tree)},
        partial_restore=True)))["state"]["params"]
    return restored, meta

  try:
    steps = manager.all_steps()
    if not steps:
      raise ValueError(f"no checkpoint under {directory}")
    if step is None:
      (restored, meta), step, damaged = faults.newest_restorable(steps, read, directory)
      for bad, reason in damaged:
        logging.warning("checkpoint step %d under %s is damaged (%s); read step %d instead",
                        bad, directory, reason, step)
    elif step not in steps:
      raise ValueError(f"{step_flag}={step}: {directory} has steps {sorted(steps)}")
    else:
      restored, meta = faults.read_step(read, step, directory, step_flag)
  finally:
    manager.close()
  return flatten(restored), meta, step


def read_tree(directory: str) -> dict[str, np.ndarray]:
  """A StandardCheckpointer directory (e.g. import_hf's params) as {'/'-path: host array}."""
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(directory)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  return flatten(checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
      item=tree, restore_args=_host_restore_args(tree))))
