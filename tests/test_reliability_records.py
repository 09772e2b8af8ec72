"""Data loss and run records (issue #12, points 1-4 and 9): an export never replaces a run or
anything but a previous export; a refused or empty resume leaves the run's records as they
were; keep_checkpoints / save_every are validated; a warmup longer than the run is clamped.

One tiny run (4 steps, checkpoints at 2 and 4) is trained once for the module; each test that
could change it works on a copy."""
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from configs import tiny
from ctxjax import hf
from ctxjax.export_hf import check_out
from ctxjax.train.config import run_config
from ctxjax.train.optim import make_optimizer
from ctxjax.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _config(data_dir, **train):
  c = tiny.get_config()  # optim.warmup_steps=30: longer than the run (clamped)
  c.model.update(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=16)
  c.data.update(seq_len=32, batch_size=2, data_dir=str(data_dir))
  c.train.update(dict(steps=STEPS, log_every=1, save_every=2, keep_checkpoints=2,
                      eval_batches=1, async_checkpoints=False), **train)
  return c


def _tree(path) -> dict:
  """relative path -> sha256 of every file (and None for every directory) under `path`."""
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path)] = None
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(data dir, workdir of a finished 4-step run, its summary); the workdir's parent also
  holds an unrelated file."""
  base = tmp_path_factory.mktemp("records")
  workdir = base / "runs" / "run"
  summary = train(_config(base / "data"), str(workdir))
  (base / "runs" / "notes.txt").write_text("not a run")
  return base / "data", workdir, summary


def _copy(workdir, tmp_path):
  target = tmp_path / "runs" / "run"
  shutil.copytree(workdir, target)
  (tmp_path / "runs" / "notes.txt").write_text("not a run")
  return target


# --- 9: warmup longer than the run


@pytest.mark.parametrize("steps", [1, 20])
def test_a_warmup_longer_than_the_run_is_clamped_with_a_warning(steps, caplog):
  config = _config("")  # optim.warmup_steps=30
  with caplog.at_level(logging.WARNING):
    _, schedule = make_optimizer(run_config(config).optim, steps)
  assert "optim.warmup_steps=30 is more than the run's" in caplog.text
  config.optim.warmup_steps = steps  # the clamp: warming up over the whole run
  _, want = make_optimizer(run_config(config).optim, steps)
  assert [float(schedule(i)) for i in range(steps)] == [float(want(i)) for i in range(steps)]
  assert float(schedule(steps - 1)) == pytest.approx(config.optim.learning_rate)


@pytest.mark.slow
def test_the_short_run_trained_under_the_clamped_warmup(run):
  _, workdir, summary = run
  assert summary["steps"] == STEPS and summary["final_train_loss"] is not None
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == STEPS
  lrs = [json.loads(l)["lr"] for l in open(workdir / "metrics.jsonl") if '"lr"' in l]
  assert len(lrs) == STEPS and lrs[-1] == pytest.approx(3e-3)  # the peak, at the last step


# --- 2: keep_checkpoints and save_every


@pytest.mark.parametrize("key, value, match", [
    ("keep_checkpoints", 0, "train.keep_checkpoints must be a positive integer, got 0"),
    ("keep_checkpoints", -1, "train.keep_checkpoints must be a positive integer, got -1"),
    ("save_every", -1, "train.save_every must be a non-negative integer, got -1"),
])
def test_keep_and_save_every_are_validated(key, value, match):
  with pytest.raises(ValueError, match=match):
    run_config(_config("", **{key: value}))


@pytest.mark.slow
def test_train_command_refuses_keep_checkpoints_0_before_writing(tmp_path):
  proc = _run("ctxjax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
              "--config.train.keep_checkpoints=0")
  assert proc.returncode != 0
  assert "train.keep_checkpoints must be a positive integer, got 0" in proc.stderr
  assert not (tmp_path / "run").exists()


# --- 3: a refused resume


@pytest.mark.slow
def test_a_refused_resume_leaves_the_records_as_they_were(run, tmp_path):
  data_dir, workdir, _ = run
  workdir = _copy(workdir, tmp_path)
  before = _tree(workdir)
  config = _config(data_dir)
  config.model.hidden_size = 64
  with pytest.raises(ValueError, match="different model"):
    train(config, str(workdir))
  assert _tree(workdir) == before  # config.json was rewritten before the check


# --- 4: a resume with no step left


@pytest.mark.slow
@pytest.mark.parametrize("steps, word", [(STEPS - 2, f"past train.steps={STEPS - 2}"),
                                         (STEPS, f"the train.steps={STEPS} of a finished run")])
def test_a_resume_with_nothing_to_train_says_so_and_writes_nothing(run, tmp_path, caplog,
                                                                   steps, word):
  data_dir, workdir, summary = run
  workdir = _copy(workdir, tmp_path)
  before = _tree(workdir)
  with caplog.at_level(logging.WARNING):
    got = train(_config(data_dir, steps=steps), str(workdir))
  assert f"nothing to train: the checkpoint in {workdir} is at step {STEPS}, {word}; " \
         "config.json, metrics.jsonl and summary.json are left as they were" in caplog.text
  assert got == json.loads(json.dumps(summary))  # the run's summary, as it was
  assert _tree(workdir) == before  # no eval of step 4 logged under step 2, no new summary


@pytest.mark.slow
def test_a_finished_run_stopped_before_its_summary_still_gets_it(run, tmp_path):
  data_dir, workdir, summary = run
  workdir = _copy(workdir, tmp_path)
  (workdir / "summary.json").unlink()  # e.g. preempted right after the last checkpoint
  config_json = (workdir / "config.json").read_bytes()
  got = train(_config(data_dir), str(workdir))
  assert got["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
  assert json.loads((workdir / "summary.json").read_text())["steps"] == STEPS
  assert (workdir / "config.json").read_bytes() == config_json


# --- 1: export --out


@pytest.mark.slow
def test_export_refuses_the_workdir_and_its_parent_and_leaves_them_identical(run, tmp_path):
  workdir = _copy(run[1], tmp_path)
  before = _tree(tmp_path)
  for out, word in ((workdir, "is --workdir"), (workdir.parent, "contains --workdir")):
    proc = _run("ctxjax.export_hf", f"--workdir={workdir}", f"--out={out}", "--overwrite")
    assert proc.returncode != 0 and f"--out={out} {word}={workdir}" in proc.stderr
    assert _tree(tmp_path) == before


def test_export_refuses_a_place_that_is_not_a_previous_export(tmp_path):
  workdir = tmp_path / "run"  # check_out reads nothing of it
  other = tmp_path / "other"
  (other / "sub").mkdir(parents=True)
  (other / "config.json").write_text("{}")
  (other / "model.safetensors").write_text("")
  (other / "sub" / "data.txt").write_text("somebody's")
  before = _tree(tmp_path)
  with pytest.raises(ValueError, match=r"--out=.*/run/hf is inside --workdir"):
    check_out(str(workdir), str(workdir / "hf"))
  with pytest.raises(ValueError, match=r"--out: .*/other is not a Hugging Face export \(it "
                                       r"holds sub\)"):
    check_out(str(workdir), str(other), overwrite=True)
  (other / "sub" / "data.txt").unlink()
  (other / "sub").rmdir()
  (other / "model.safetensors").unlink()
  with pytest.raises(ValueError, match=r"not a Hugging Face export \(it holds config.json\)"):
    check_out(str(workdir), str(other), overwrite=True)  # no weights: not an export
  assert set(_tree(tmp_path)) == set(before) - {"other/sub", "other/sub/data.txt",
                                               "other/model.safetensors"}


@pytest.mark.slow
def test_export_replaces_a_previous_export_only_with_overwrite(run, tmp_path):
  workdir, out = run[1], tmp_path / "hf"
  proc = _run("ctxjax.export_hf", f"--workdir={workdir}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  first = _tree(out)
  assert "config.json" in first and "model.safetensors" in first
  with pytest.raises(ValueError, match="holds a Hugging Face export; pass overwrite=True"):
    check_out(str(workdir), str(out))
  (out / "model.safetensors").write_bytes(b"stale")
  proc = _run("ctxjax.export_hf", f"--workdir={workdir}", f"--out={out}", "--overwrite")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert _tree(out) == first
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary directories left


def test_hf_save_replaces_only_an_export(tmp_path):
  other = tmp_path / "other"
  other.mkdir()
  (other / "keep.txt").write_text("x")
  for overwrite in (False, True):
    with pytest.raises(FileExistsError, match=r"other is not a Hugging Face export \(it holds "
                                              r"keep.txt\) and is never replaced"):
      hf.check_target(other, overwrite=overwrite)
  hf.check_target(tmp_path / "new")  # absent, or empty: fine
  (tmp_path / "empty").mkdir()
  hf.check_target(tmp_path / "empty")
