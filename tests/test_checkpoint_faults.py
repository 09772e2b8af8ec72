"""Checkpoint faults: a damaged newest checkpoint (truncated, missing or zero-filled file) falls
back to the previous one (moved aside, never deleted; one line, no orbax tracebacks), an
explicit --step of a damaged one fails in one line, and an unwritable checkpoint directory
stops a run before step 1 or, when it becomes unwritable mid-run, at the next step without
orbax's minutes of timeouts."""
import glob
import io
import json
import logging as std_logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.train.checkpoint import Checkpointer, abstract_like, read_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAMAGES = ("truncated", "missing", "zeroed")


def _state(scale):
  return {"params": {"w": jnp.arange(600, dtype=jnp.float32) * scale},
          "opt": jnp.full((3, 5), scale, jnp.float32)}


def _save_two(workdir):
  ckpt = Checkpointer(workdir, save_every=1, keep=3)
  for step in (1, 2):
    ckpt.save(step, _state(step), data_state={"batches": step},
              meta={"model_config": {"hidden_size": 32}})
  ckpt.close()
  return os.path.join(workdir, "checkpoints")


def _damage(step_dir, how):
  """The largest file of a checkpoint (an array's data) truncated, removed or zero-filled."""
  files = [f for f in glob.glob(f"{step_dir}/**", recursive=True) if os.path.isfile(f)]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  if how == "truncated":
    os.truncate(path, size // 2)
  elif how == "missing":
    os.remove(path)
  else:
    with open(path, "wb") as f:
      f.write(b"\0" * size)
  return os.path.relpath(path, step_dir)


def _orbax_noise(caplog, capfd):
  errors = [r for r in caplog.records if r.levelno >= std_logging.ERROR]
  return errors, capfd.readouterr().err.count("Traceback")


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(tmp_path, how, caplog, capfd):
  directory = _save_two(str(tmp_path))
  damaged_file = _damage(f"{directory}/2", how)
  capfd.readouterr()
  ckpt = Checkpointer(str(tmp_path), save_every=1, keep=3)
  with caplog.at_level(std_logging.WARNING):
    state, data_state, _ = ckpt.restore(abstract_like(_state(1)), model_config={})
  # exactly step 1's state, bit for bit
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(1))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert data_state == {"batches": 1}
  assert ckpt.latest_step() == 1
  assert sorted(os.listdir(directory)) == ["1", "2.corrupt"]
  assert os.path.exists(f"{directory}/2.corrupt/{damaged_file}") == (how != "missing")
  warnings = [r.getMessage() for r in caplog.records if r.levelno == std_logging.WARNING]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert "step 2 is damaged" in warnings[0] and "2.corrupt" in warnings[0]
  assert _orbax_noise(caplog, capfd) == ([], 0)
  # the resumed run writes step 2 again
  ckpt.save(2, _state(2), data_state={"batches": 2}, meta={"model_config": {}})
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2", "2.corrupt"]


def test_export_reader_falls_back_without_moving_and_explicit_step_fails(tmp_path, caplog,
                                                                         capfd):
  directory = _save_two(str(tmp_path))
  _damage(f"{directory}/2", "truncated")
  capfd.readouterr()
  with caplog.at_level(std_logging.WARNING):
    flat, _, step = read_params(directory)
  assert step == 1
  np.testing.assert_array_equal(flat["w"], np.asarray(_state(1)["params"]["w"]))
  assert sorted(os.listdir(directory)) == ["1", "2"]  # readers never change a workdir
  with pytest.raises(ValueError) as err:
    read_params(directory, 2, step_flag="--step")
  assert str(err.value).startswith(f"--step=2: checkpoint {directory}/2 does not restore (")
  assert "\n" not in str(err.value) and len(str(err.value)) < 600
  assert _orbax_noise(caplog, capfd) == ([], 0)


def test_nothing_moves_when_no_checkpoint_restores_or_the_model_differs(tmp_path):
  directory = _save_two(str(tmp_path))
  ckpt = Checkpointer(str(tmp_path), save_every=1, keep=3)
  with pytest.raises(ValueError, match="belongs to a different model; differing model config "
                     "keys: hidden_size: 32 -> 64"):
    ckpt.restore(abstract_like(_state(1)), model_config={"hidden_size": 64})
  # another state layout (e.g. another optimizer) fails on every step alike: not damage
  other = {"params": {"w": jnp.zeros(7)}, "opt": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"no checkpoint under .* restores \(step 2: .*; step 1:"):
    ckpt.restore(abstract_like(other), model_config={})
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]


def _unwritable(path):
  """A checkpoint directory that cannot be written: chmod, or for root (who ignores
  permissions) a file where the directory should be."""
  if os.geteuid() == 0:
    if os.path.isdir(path):
      os.rename(path, f"{path}.away")
    open(path, "w").close()
  else:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o555)


def test_unwritable_checkpoint_directory_fails_at_construction(tmp_path):
  _unwritable(str(tmp_path / "checkpoints"))
  with pytest.raises(PermissionError, match=r"checkpoint directory .*checkpoints is not "
                     r"writable \(.*\); fix its permissions or use another --workdir"):
    Checkpointer(str(tmp_path), save_every=1, keep=1)


def _orbax_threads():
  return [t for t in threading.enumerate()
          if t.is_alive() and type(t).__module__.startswith("orbax")]


def test_a_save_failing_mid_run_stops_at_the_next_step_without_hanging(tmp_path, caplog):
  ckpt = Checkpointer(str(tmp_path), save_every=1, keep=3)
  ckpt.save(1, _state(1), data_state={}, meta={"model_config": {}})
  ckpt.wait()
  _unwritable(ckpt.directory)
  with caplog.at_level(std_logging.ERROR), pytest.raises(PermissionError) as err:
    for step in range(2, 50):  # the failure shows at the save after the one that failed
      ckpt.save(step, _state(step), data_state={}, meta={"model_config": {}})
      time.sleep(0.1)
  assert str(err.value).startswith(f"saving a checkpoint to {ckpt.directory} failed (")
  assert re.search(r"; complete checkpoints there: (\[1\]|none: it cannot be listed)$",
                   str(err.value)), str(err.value)
  assert "\n" not in str(err.value)
  # orbax's background threads ended (they would wait 300 s for a directory signal, and the
  # interpreter for them at exit); what orbax logged kept to one line a record
  assert [t.name for t in _orbax_threads()] == []
  assert all(r.exc_info is None and "\n" not in r.getMessage() for r in caplog.records)
  ckpt.close()


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "ctxjax.train", "--config=configs/tiny.py",
          f"--workdir={workdir}", "--config.train.log_every=1", "--config.train.eval_batches=1",
          "--config.model.num_hidden_layers=1", "--config.model.hidden_size=32",
          "--config.model.intermediate_size=64", "--config.model.num_attention_heads=2",
          "--config.model.num_key_value_heads=2", "--config.model.head_dim=16",
          "--config.data.seq_len=32", "--config.data.batch_size=2",
          "--config.optim.warmup_steps=2", *extra]


def _env(tmp_path):
  return {**os.environ, "CTXJAX_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": ROOT}


def test_train_with_an_unwritable_checkpoint_dir_exits_before_step_1(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  _unwritable(str(workdir / "checkpoints"))
  # 120 s guards against the hang (orbax's timeouts: minutes); it exits in seconds
  proc = subprocess.run(_train_cmd(workdir, "--config.train.steps=4",
                                   "--config.train.save_every=2"),
                        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0
  assert "checkpoints is not writable" in proc.stderr
  assert not (workdir / "metrics.jsonl").exists()  # no step was taken


def _losses(workdir):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8"):
    r = json.loads(line)
    if "loss" in r:
      out[r["step"]] = r["loss"]
  return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """8 uninterrupted steps, checkpoints at 4 and 8."""
  base = tmp_path_factory.mktemp("faults")
  workdir = base / "full"
  subprocess.run(_train_cmd(workdir, "--config.train.steps=8", "--config.train.save_every=4"),
                 cwd=ROOT, env=_env(base), check=True, capture_output=True, timeout=900)
  return base, workdir


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_resume_after_a_damaged_checkpoint_matches_an_uninterrupted_run(full_run, tmp_path, how):
  base, full = full_run
  want = _losses(full)
  assert sorted(want) == list(range(1, 9))
  workdir = tmp_path / "damaged"
  shutil.copytree(full, workdir)
  _damage(str(workdir / "checkpoints" / "8"), how)
  # export_hf reads parameters from the newest checkpoint whose parameters restore (the damage
  # may sit in the optimizer state it does not read), and moves nothing
  from ctxjax import export_hf
  model, variables, _ = export_hf.read_workdir(str(workdir))
  assert model.cfg.hidden_size == 32 and variables["params"]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
  proc = subprocess.run(_train_cmd(workdir, "--config.train.steps=8",
                                   "--config.train.save_every=4"),
                        cwd=ROOT, env=_env(base), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint step 8 is damaged" in proc.stderr
  assert "Traceback" not in proc.stderr  # no orbax walls
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8", "8.corrupt"]
  # steps 5..8 retrained from step 4: the same bits as the uninterrupted run
  assert _losses(workdir) == want


def test_asyncio_records_of_failed_orbax_tasks_keep_one_line():
  """asyncio logs a collected task's unretrieved exception with its traceback; for a task that
  ran orbax code (a damaged checkpoint's read) the record keeps one line."""
  from ctxjax.train import checkpoint_faults
  namespace = {}
  exec(compile("def read_shard():\n  raise ValueError('ZSTD_decompressStream() failed\\nmore')\n",
               "/site-packages/orbax/checkpoint/_src/serialization/fake.py", "exec"), namespace)
  try:
    namespace["read_shard"]()
  except ValueError:
    exc_info = sys.exc_info()
  stream = io.StringIO()
  handler = std_logging.StreamHandler(stream)
  logger = std_logging.getLogger("asyncio")
  logger.addHandler(handler)
  try:
    checkpoint_faults.quiet_orbax_tasks()
    checkpoint_faults.quiet_orbax_tasks()  # once only
    assert sum(isinstance(f, checkpoint_faults.OrbaxTasksOneLine) for f in logger.filters) == 1
    logger.error("Task exception was never retrieved\nfuture: <Task finished coro=<read()>>",
                 exc_info=exc_info)
    try:
      raise RuntimeError("not orbax")
    except RuntimeError:
      logger.error("another task failed", exc_info=True)
  finally:
    logger.removeHandler(handler)
  lines = stream.getvalue().splitlines()
  assert lines[0] == ("Task exception was never retrieved: ValueError: "
                      "ZSTD_decompressStream() failed")
  assert lines[1] == "another task failed" and "Traceback" in stream.getvalue().split("\n", 2)[2]
