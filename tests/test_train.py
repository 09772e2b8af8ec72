"""End to end: `python -m ctxjax.train` on the demo corpus writes the contract files and learns."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_command_writes_metrics_and_learns(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "CTXJAX_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "ctxjax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", "--config.train.steps=40", "--config.train.log_every=10",
         "--config.train.eval_batches=2", "--config.model.num_hidden_layers=2",
         "--config.data.seq_len=128", "--config.data.batch_size=8",
         "--config.optim.warmup_steps=5"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["steps"] == 40 and config["model"]["num_hidden_layers"] == 2
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in records if "loss" in r]
  assert [r["step"] for r in steps] == [1, 10, 20, 30, 40]
  for r in steps:
    assert {"step", "loss", "lr", "seq_len", "tokens_per_sec"} <= set(r)
    assert r["seq_len"] == 128 and r["tokens_per_sec"] > 0
  assert steps[0]["loss"] == pytest.approx(6.93, abs=0.1)  # ln(1024): uniform at init
  summary = json.loads((workdir / "summary.json").read_text())
  # 40 steps already beat a context-free (unigram) model of the corpus.
  assert summary["eval_loss"] < summary["unigram_entropy"]
  assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
  assert os.listdir(workdir / "tensorboard")


def test_train_command_rejects_a_bad_override(tmp_path):
  cmd = [sys.executable, "-m", "ctxjax.train", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", "--config.model.position_embedding_type=rotary"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "position_embedding_type" in proc.stderr and "valid choices" in proc.stderr


def test_train_refuses_positions_past_an_absolute_table(tmp_path):
  cmd = [sys.executable, "-m", "ctxjax.train", "--config=configs/tiny_absolute.py:learned",
         f"--workdir={tmp_path}", "--config.data.seq_len=1024"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "max_position_embeddings=512" in proc.stderr and "data.seq_len" in proc.stderr


def test_train_refuses_per_document_offsets_with_an_absolute_table(tmp_path):
  """per_document positions continue a long file's offsets across rows (unbounded): a learned
  table gave NaN at step 1; now one line names the fix before anything compiles."""
  cmd = [sys.executable, "-m", "ctxjax.train", "--config=configs/tiny_absolute.py:learned",
         f"--workdir={tmp_path}", "--config.data.packed_positions=per_document"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert "data.packed_positions='continuous'" in last and "max_position_embeddings=512" in last
