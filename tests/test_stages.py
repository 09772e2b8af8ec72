"""GrowLength stages as data: resolution rules and a real staged run with a stage change of
rope_theta; resume inside a later stage."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import tiny
from ctxjax.train.stages import resolve_stages, stage_of, total_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(stages):
  config = tiny.get_config()
  config.data.update(seq_len=128, batch_size=4)
  config.train.steps = 10
  config.stages = stages
  return config


def test_constant_tokens_per_step_halves_the_batch_when_length_doubles():
  stages = resolve_stages(_config([dict(seq_len=64, tokens=64 * 8 * 5),
                                   dict(seq_len=128, steps=3),
                                   dict(seq_len=256, steps=2, rope_theta=5e4)]))
  assert [(s.seq_len, s.batch_size, s.steps, s.first_step) for s in stages] == [
      (64, 8, 5, 1), (128, 4, 3, 6), (256, 2, 2, 9)]
  assert stages[2].model_overrides == {"rope_theta": 5e4}
  assert total_steps(stages) == 10 and stage_of(stages, 8).index == 1


@pytest.mark.parametrize("stages, match", [
    ([dict(seq_len=64)], "exactly one of steps, tokens"),
    ([dict(seq_len=96, steps=2)], "does not divide"),
    ([dict(seq_len=64, steps=1, window=3)], "unknown config key stages\\[0\\].window"),
    ([dict(steps=1)], r"stages\[0\].seq_len is required"),
    ([dict(seq_len=-64, steps=1)], r"stages\[0\].seq_len must be a positive integer, got -64"),
])
def test_bad_stages_are_refused(stages, match):
  with pytest.raises(ValueError, match=match):
    resolve_stages(_config(stages))


STAGED_CONFIG = '''
from configs import tiny
def get_config():
  c = tiny.get_config()
  c.model.num_hidden_layers = 1
  c.data.seq_len, c.data.batch_size = 64, 8
  c.train.update(dict(log_every=2, eval_batches=1, save_every=3))
  c.optim.warmup_steps = 2
  c.stages = [dict(seq_len=64, steps=4), dict(seq_len=128, steps=4),
              dict(seq_len=256, steps=4, rope_theta=40000.0)]
  return c
'''


@pytest.mark.slow
def test_staged_run_walks_the_stages_and_resumes_mid_stage(tmp_path):
  cfg_path = tmp_path / "staged.py"
  cfg_path.write_text(STAGED_CONFIG)
  env = {**os.environ, "CTXJAX_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu"}
  cmd = lambda w, *extra: [sys.executable, "-m", "ctxjax.train", f"--config={cfg_path}",
                           f"--workdir={w}", *extra]
  full = tmp_path / "full"
  subprocess.run(cmd(full), cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  rows = [json.loads(l) for l in open(full / "metrics.jsonl") if '"loss"' in l]
  assert [(r["step"], r["stage"], r["seq_len"], r["batch_size"]) for r in rows] == [
      (1, 0, 64, 8), (2, 0, 64, 8), (4, 0, 64, 8), (5, 1, 128, 4), (6, 1, 128, 4),
      (8, 1, 128, 4), (9, 2, 256, 2), (10, 2, 256, 2), (12, 2, 256, 2)]
  lrs = [r["lr"] for r in rows]
  assert lrs[2] > lrs[-1]  # one cosine schedule across the stages

  # Kill (SIGKILL) inside stage 2 once step 9's checkpoint is final, then resume: same losses.
  part = tmp_path / "part"
  proc = subprocess.Popen(cmd(part), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (part / "checkpoints" / "9").is_dir():
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  resumed = subprocess.run(cmd(part), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  got = {r["step"]: r["loss"] for r in map(json.loads, open(part / "metrics.jsonl"))
         if "loss" in r}
  want = {r["step"]: r["loss"] for r in rows}
  assert got == want


def test_each_stage_builds_its_model_with_its_positional_overrides(tmp_path, monkeypatch):
  """The model each stage's step is built from carries that stage's rope_theta / rope_scaling
  (and the earlier stages keep config.model's): recorded from the trainer's stage runs, the
  steps and the data skipped."""
  from ctxjax.train import trainer  # noqa: PLC0415
  seen = []

  def record(loop, state):
    seen.append((loop.run.stage.index, loop.run.model.cfg))
    return state

  class NoData:  # no batch is read: the steps are skipped and eval_batches is 0
    unigram_entropy = staticmethod(lambda: 0.0)

  monkeypatch.setattr(trainer, "_train_stage", record)
  monkeypatch.setattr(trainer.data_registry, "build", lambda *a, **k: NoData())
  linear = dict(rope_type="linear", factor=2.0)
  config = _config([dict(seq_len=64, steps=1), dict(seq_len=128, steps=1, rope_theta=5e4),
                    dict(seq_len=256, steps=1, rope_theta=2e5, rope_scaling=linear)])
  config.model.update(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16)
  config.train.update(eval_batches=0, save_every=0)
  config.optim.warmup_steps = 1
  base = config.model.rope_theta
  trainer.train(config, str(tmp_path / "run"))
  assert [(i, m.rope_theta, m.rope_scaling) for i, m in seen] == [
      (0, base, None), (1, 5e4, None), (2, 2e5, linear)]
