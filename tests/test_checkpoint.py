"""Checkpoints: a run killed (SIGKILL) at a random step and restarted from its workdir reaches
bit-identical losses; SIGTERM leaves a usable checkpoint; another model's workdir is refused."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from ctxjax.train.checkpoint import config_differences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "ctxjax.train", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
          "--config.train.save_every=4", "--config.train.eval_batches=1",
          "--config.model.num_hidden_layers=1", "--config.model.hidden_size=64",
          "--config.model.intermediate_size=128", "--config.model.num_attention_heads=2",
          "--config.model.num_key_value_heads=2", "--config.model.head_dim=32",
          "--config.data.seq_len=64", "--config.data.batch_size=4",
          "--config.optim.warmup_steps=2", *extra]


def _env(tmp_path):
  return {**os.environ, "CTXJAX_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu"}


def _losses(workdir):
  """step -> loss, the last record of each step winning (a resumed run rewrites some)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path, encoding="utf-8"):
      r = json.loads(line)
      if "loss" in r:
        out[r["step"]] = r["loss"]
  return out


def _finalized(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(c) for c in os.listdir(path) if c.isdigit()) if os.path.isdir(path) else []


def _run_until(cmd, env, workdir, step, sig, need_checkpoint=False):
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while (max(_losses(workdir), default=0) < step
         or (need_checkpoint and not _finalized(workdir))):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(sig)
  proc.wait(timeout=120)
  return proc


@pytest.mark.slow
def test_sigkill_and_resume_reaches_identical_losses(tmp_path):
  env = _env(tmp_path)
  full = tmp_path / "full"
  subprocess.run(_cmd(full), cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  want = _losses(full)
  assert sorted(want) == list(range(1, STEPS + 1))

  killed = tmp_path / "killed"
  kill_at = random.Random().randint(6, STEPS - 6)
  proc = _run_until(_cmd(killed), env, killed, kill_at, signal.SIGKILL, need_checkpoint=True)
  assert proc.returncode == -signal.SIGKILL
  resume_from = _finalized(killed)[-1]  # a half-written "*.orbax-checkpoint-tmp" is ignored
  assert 0 < resume_from < STEPS
  subprocess.run(_cmd(killed), cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  got = _losses(killed)
  # CPU XLA is deterministic: same data order, RNG and state -> the same bits.
  assert got == want, (kill_at, {s: (got.get(s), want[s]) for s in want if got.get(s) != want[s]})


@pytest.mark.slow
def test_sigterm_saves_then_a_different_model_is_refused(tmp_path):
  env = _env(tmp_path)
  workdir = tmp_path / "run"
  proc = _run_until(_cmd(workdir), env, workdir, 5, signal.SIGTERM)
  assert proc.returncode == 1, proc.stderr.read()[-2000:]
  saved = _finalized(workdir)
  last = max(_losses(workdir))
  assert saved[-1] == last  # the step in flight when the signal came was saved
  other = subprocess.run(_cmd(workdir, "--config.model.hidden_size=96"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
  assert other.returncode != 0
  assert "hidden_size: 64 -> 96" in other.stderr
  resumed = subprocess.run(_cmd(workdir), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert max(_losses(workdir)) == STEPS


def test_config_differences_name_the_keys():
  a = {"hidden_size": 64, "position_embedding_type": "rope", "rope_theta": 1e4}
  b = {"hidden_size": 64, "position_embedding_type": "alibi", "rope_theta": 5e5}
  assert config_differences(a, b) == ["position_embedding_type: 'rope' -> 'alibi'"]
