"""python -m ctxjax.evaluate: bad input -> one line, exit 2; one small end-to-end run."""
import json
import os
import re
import subprocess
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from ctxjax import evaluate
from ctxjax.eval import run as run_lib
from ctxjax.model.config import model_config_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=128)


def _command(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "ctxjax.evaluate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_unknown_task_exits_2_with_one_line(tmp_path):
  p = _command(f"--workdir={tmp_path}", "--tasks=ppl,passkee")
  assert p.returncode == 2, p.stderr
  assert "Traceback" not in p.stderr + p.stdout
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and "--tasks='passkee'" in lines[0] and "valid choices" in lines[0]


def test_workdir_without_checkpoint_exits_2(tmp_path):
  p = _command(f"--workdir={tmp_path}", "--tasks=ppl")
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert len(p.stderr.strip().splitlines()) == 1 and "no checkpoint" in p.stderr


def test_length_past_learned_table_is_refused():
  cfg = model_config_from_dict(dict(TINY, position_embedding_type="learned"))
  with pytest.raises(run_lib.EvalInputError, match="max_position_embeddings=128"):
    run_lib.check_lengths(cfg, [64, 256])
  run_lib.check_lengths(cfg, [64, 128])
  run_lib.check_lengths(model_config_from_dict(TINY), [4096])  # rope: no table


def _tiny_workdir(tmp_path):
  """An import_hf-layout workdir + config.json naming a tokenizer and a small demo corpus."""
  import orbax.checkpoint as ocp

  from ctxjax import import_hf
  from ctxjax.data import corpus as corpus_lib
  from ctxjax.data import tokenizer as tokenizer_lib
  from ctxjax.model.transformer import Transformer
  data_dir = tmp_path / "data"
  corpus = data_dir / corpus_lib.CORPUS_NAME
  corpus.mkdir(parents=True)
  rng = np.random.default_rng(0)
  words = "alpha beta gamma delta code docs legal license def return the of and".split()
  with open(corpus / corpus_lib.JSONL_NAME, "w") as f:
    for src in ("code", "docs", "legal"):
      for _ in range(3):
        text = " ".join(rng.choice(words, 400)) + "."
        f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": src}}) + "\n")
  tok = tokenizer_lib.train_tokenizer(str(corpus / corpus_lib.JSONL_NAME),
                                      str(tmp_path / "spm"), vocab_size=300)
  workdir = tmp_path / "run"
  workdir.mkdir()
  model = Transformer(model_config_from_dict(TINY))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                              np.zeros((1, 4), np.int32))["params"])
  (workdir / import_hf.MODEL_CONFIG).write_text(json.dumps(TINY))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(workdir / import_hf.PARAMS_DIR), params)
  ckpt.wait_until_finished()
  (workdir / "config.json").write_text(json.dumps(
      {"data": {"seq_len": 32, "tokenizer": tok.path, "data_dir": str(data_dir)}}))
  return workdir


def test_end_to_end_ppl_and_passkey(tmp_path, monkeypatch):
  workdir = _tiny_workdir(tmp_path)

  def generate(model, variables, prompts, n, **kw):  # the key, read off the prompt
    tok = generate.tok
    key = re.search(r"pass key is (\d+)", tok.decode(prompts[0].tolist())).group(1)
    new = (tok.encode(" " + key) + [tok.eos_id] * n)[:n]
    return np.concatenate([prompts, np.tile(new, (len(prompts), 1))], axis=1)
  monkeypatch.setattr(evaluate, "_generate_fn", lambda: generate)
  real_load = run_lib.load_run

  def load(*a, **k):
    run = real_load(*a, **k)
    generate.tok = run.tokenizer
    return run
  monkeypatch.setattr(run_lib, "load_run", load)
  f = types.SimpleNamespace(
      workdir=str(workdir), step=None, hf=None, tokenizer=None, tasks=["ppl", "passkey"],
      lengths=["256"], depths=["0", "1"], samples=1, ppl_protocol="nonoverlap",
      stride=None, max_tokens=256, batch_tokens=256, batch_size=1, compress_budget=None,
      compress_workdir=None, compare=[], seed=0)
  path = evaluate.evaluate(f)
  out = workdir / "eval"
  ppl = json.loads((out / "ppl.json").read_text())
  assert set(ppl["per_source"]) == {"code", "docs", "legal"} and ppl["train_length"] == 32
  assert ppl["overall"]["256"]["tokens"] > 0 and ppl["overall"]["256"]["ppl"] > 1
  passkey = json.loads((out / "passkey.json").read_text())
  assert passkey["scores"] == [[1.0], [1.0]]
  assert (out / "ppl.png").stat().st_size > 1000 and (out / "passkey.png").exists()
  text = open(path).read()
  assert "![passkey](passkey.png)" in text and "| 256 |" in text
