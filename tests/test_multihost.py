"""Multi-host for real on one machine: two processes x 4 fake CPU devices, collectives over gloo,
train the same steps as one process with 8 devices and the same global batch, and save one
joint checkpoint."""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["--config.train.steps=3", "--config.train.log_every=1", "--config.train.save_every=3",
             "--config.train.eval_batches=1", "--config.optim.warmup_steps=1",
             "--config.model.num_hidden_layers=2", "--config.model.hidden_size=64",
             "--config.model.intermediate_size=128", "--config.model.head_dim=16",
             "--config.data.seq_len=64", "--config.data.batch_size=8",
             "--config.mesh.ici_data=2", "--config.mesh.ici_fsdp=2", "--config.mesh.ici_context=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(tmp_path, devices):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "CTXJAX_DATA_DIR": str(tmp_path / "data"),
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"
                       " --xla_backend_optimization_level=0"}


def _losses(workdir):
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in records if "loss" in r], [r["eval_loss"] for r in records
                                                       if "eval_loss" in r]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  cmd = [sys.executable, "-m", "ctxjax.train", "--config=configs/tiny.py", *OVERRIDES]
  single = subprocess.run([*cmd, f"--workdir={tmp_path / 'one'}"], cwd=ROOT,
                          env=_env(tmp_path, 8), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  port, workdir = _free_port(), tmp_path / "two"
  procs = [subprocess.Popen([*cmd, f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
                             "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=_env(tmp_path, 4), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "process 1 of 2; 4 local / 8 global devices" in outs[1][1]

  one, two = _losses(tmp_path / "one"), _losses(workdir)
  assert len(one[0]) == 3 and len(two[0]) == 3
  assert two[0] == pytest.approx(one[0], abs=1e-5), (one, two)
  assert two[1] == pytest.approx(one[1], abs=1e-5), (one, two)
  assert os.listdir(workdir / "checkpoints") == ["3"]  # one checkpoint, written jointly
