"""config.eval: the evaluation tasks run during training (ctxjax/eval/during_training.py)."""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from ml_collections.config_flags import config_flags as _cf

from ctxjax.train.config import EVAL_TASKS, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# configs/tiny.py shrunk to seconds: 4 steps of 2 x 64 tokens, one small layer.
SMALL = ["--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_batches=1",
         "--config.train.save_every=0", "--config.data.seq_len=64", "--config.data.batch_size=2",
         "--config.model.num_hidden_layers=1", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.model.head_dim=16",
         "--config.optim.warmup_steps=1"]


def _tiny():
  return _cf.ConfigFileFlagParser(name="config").parse(TINY).to_dict()


def _tensorboard_scalars(directory: str) -> dict:
  """{tag: [(step, value)]} of tensorboardX event files (TFRecords: length, crc, event, crc)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in glob.glob(os.path.join(directory, "events*")):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      n = struct.unpack("<Q", data[i:i + 8])[0]
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 16 + n
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_train_command_logs_eval_scores_at_the_chosen_steps(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "ctxjax.train", f"--config={TINY}", f"--workdir={workdir}",
         *SMALL, "--config.eval.every=2", "--config.eval.tasks=('ppl', 'passkey')",
         "--config.eval.lengths=(128,)", "--config.eval.depths=(0.5,)",
         "--config.eval.max_tokens=256"]
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in records if "eval/ppl@128" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for r in evals:
    assert 1 < r["eval/ppl@128"] < 5000  # about the vocabulary size (1024) after 4 steps
    assert r["eval/passkey@128"] in (0.0, 1.0)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["eval"]["eval/ppl@128"] == evals[-1]["eval/ppl@128"]
  # TensorBoard gets the same scalars (tensorboardX writes '@' in a tag as '_').
  tb = _tensorboard_scalars(str(workdir / "tensorboard"))
  assert [step for step, _ in tb["eval/ppl_128"]] == [2, 4]
  assert [step for step, _ in tb["eval/passkey_128"]] == [2, 4]


@pytest.mark.parametrize("value, match", [
    (dict(evry=2), r"^unknown config key eval.evry; did you mean 'eval.every'\?"),
    (dict(every=-1), r"^eval.every must be a non-negative integer, got -1$"),
    (dict(tasks=["ppl", "pasky"]), r"^eval.tasks='pasky'; did you mean 'passkey'\?"),
    (dict(tasks=[]), r"^eval.tasks is empty; valid choices"),
    (dict(tasks="ppl"), r"^eval.tasks must be a list, got 'ppl'$"),
    (dict(lengths=[128, 0]), r"^eval.lengths must be a list of positive integers"),
    (dict(lengths=[64.5]), r"^eval.lengths must be a list of positive integers"),
    (dict(depths=[0.5, 2]), r"^eval.depths must be fractions in \[0, 1\]"),
    (dict(samples=0), r"^eval.samples must be a positive integer, got 0$"),
])
def test_bad_eval_settings_name_the_key(value, match):
  config = _tiny()
  config["eval"].update(value)
  with pytest.raises(ValueError, match=match):
    run_config(config)


def test_eval_section_is_optional_and_off_by_default():
  config = _tiny()
  assert run_config(config).eval.every == 0  # configs/tiny.py shows it, off
  del config["eval"]
  run = run_config(config)
  assert (run.eval.every, run.eval.tasks, run.eval.lengths) == (0, ("ppl", "passkey"), ())


def test_eval_tasks_match_the_runner():
  from ctxjax.eval.during_training import SUBTASKS
  assert sorted(SUBTASKS.names()) == sorted(EVAL_TASKS)


def test_train_without_an_evaluator_refuses_config_eval(tmp_path):
  from ctxjax.train.trainer import train
  config = _tiny()
  config["eval"]["every"] = 2
  with pytest.raises(ValueError, match="config.eval.every is set but train.. got no "
                                       "make_evaluator"):
    train(config, str(tmp_path))


def test_bad_override_of_the_command_is_one_line(tmp_path):
  cmd = [sys.executable, "-m", "ctxjax.train", f"--config={TINY}",
         f"--workdir={tmp_path}", "--config.eval.evry=2"]
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "unknown config key eval.evry; did you mean 'eval.every'?" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_a_length_too_short_for_the_prompt_fails_before_training():
  from ctxjax.data.config import data_config
  from ctxjax.eval.during_training import make_evaluator
  from ctxjax.model import model_config_from_dict
  from ctxjax.train.config import EvalConfig
  config = _tiny()
  with pytest.raises(ValueError, match=r"^config.eval.lengths: 16 is too short for passkey"):
    make_evaluator(EvalConfig(every=1, lengths=(16,)), data_cfg=data_config(config["data"]),
                   model_cfg=model_config_from_dict(config["model"]), train_length=256)


def test_retrieval_tasks_need_a_model_that_decodes_with_a_cache():
  from ctxjax.data.config import data_config
  from ctxjax.eval.during_training import make_evaluator
  from ctxjax.model import model_config_from_dict
  from ctxjax.train.config import EvalConfig
  config = _tiny()
  config["model"].update(attention_mode="dilated", attention_impl="blockwise")
  config["model"]["attention_options"] = dict(segment_lengths=[128, 256], dilation_rates=[1, 2])
  model_cfg = model_config_from_dict(config["model"])
  with pytest.raises(ValueError, match=r"^config.eval.tasks: passkey generate text, but "
                                       r"model.attention_mode='dilated'"):
    make_evaluator(EvalConfig(every=1), data_cfg=data_config(config["data"]),
                   model_cfg=model_cfg, train_length=256)
