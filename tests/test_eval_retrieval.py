"""Retrieval grid and compression comparison with a scripted generator (the harness, not a
model: the generator answers right or wrong by where the needle sits)."""
import json
import os
import re

import numpy as np
import pytest

from ctxjax.data import synthetic
from ctxjax.eval import compress_eval, plots, retrieval


class CharTokenizer:
  """ASCII characters as ids 4..131; bos 2, eos 3."""
  vocab_size, bos_id, eos_id, pad_id = 132, 2, 3, 0

  def encode(self, text):
    return [ord(c) + 4 for c in text if ord(c) < 128]

  def decode(self, ids):
    return "".join(chr(i - 4) for i in ids if i >= 4)


def scripted_generate(rule):
  """generate_fn answering the passkey correctly iff rule(relative needle position)."""
  tok = CharTokenizer()

  def generate(model, variables, prompts, max_new_tokens, *, temperature=0.0, top_p=1.0,
               seed=0, prompt_lengths=None, eos_id=None):
    assert temperature == 0.0 and list(prompt_lengths) == [prompts.shape[1]] * len(prompts)
    rows = []
    for row in np.asarray(prompts):
      text = tok.decode(row.tolist())
      m = re.search(r"The pass key is (\d+)", text)
      if m is None:  # the key was cut out of the prompt
        key = 0
      else:
        key = int(m.group(1)) if rule(m.start() / len(text)) else int(m.group(1)) + 1
      new = (tok.encode(f" {key}.") + [eos_id] * max_new_tokens)[:max_new_tokens]
      rows.append(np.concatenate([row, new]))
    return np.asarray(rows, np.int32)
  return generate


def test_scripted_grid_gives_exactly_that_grid(tmp_path):
  gen = scripted_generate(lambda where: where < 0.7)  # wrong only when the key is at the end
  res = retrieval.retrieval_grid(gen, None, None, CharTokenizer(), "passkey", [800, 1600],
                                 [0.0, 0.5, 1.0], samples=2, batch_size=4)
  assert res["scores"] == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
  assert len(res["samples"]) == 2 * 3 * 2 and not res["haystack_repeated"]
  assert all(s["prediction"].strip().rstrip(".").isdigit() for s in res["samples"])
  path = tmp_path / "passkey.json"
  path.write_text(json.dumps(res))
  assert json.loads(path.read_text())["scores"] == res["scores"]
  png = plots.retrieval_heatmap(res, str(tmp_path / "passkey.png"), train_length=800)
  assert os.path.getsize(png) > 1000


def test_short_haystack_is_repeated_and_recorded():
  lines = []
  tok = CharTokenizer()

  def needle_gen(model, variables, prompts, n, **kw):  # always the needle sentence
    new = (tok.encode(" " + synthetic.FU_NEEDLE) + [3] * n)[:n]
    return np.concatenate([prompts, np.tile(new, (len(prompts), 1))], axis=1)
  res = retrieval.retrieval_grid(needle_gen, None, None, tok, "needle", [600], [0.5],
                                 haystack=["A short text. It ends here."], echo=lines.append,
                                 max_new_tokens=200)
  assert res["haystack_repeated"] and len(lines) == 1 and "repeated" in lines[0]
  assert res["scores"] == [[1.0]]


def test_unknown_task_names_valid_choices():
  with pytest.raises(ValueError, match="valid choices"):
    retrieval.check_task("passkee")


def test_compression_eval_same_budget():
  gen = scripted_generate(lambda where: True)
  tok = CharTokenizer()
  flat = lambda ids: -np.ones(len(ids) - 1)  # noqa: E731  (a model that prefers nothing)

  def keyed(ids):  # likes the question after a chunk holding the key line
    hit = re.search(r"pass key is \d", tok.decode(ids.tolist()))
    return np.full(len(ids) - 1, -0.1 if hit else -1.0)

  kw = dict(depths=[1.0], chunk_tokens=64)
  res = compress_eval.compression_eval(gen, None, None, tok, flat, "passkey", [600],
                                       budget=300, **kw)
  # the key is at the end: truncation (keeping the end) finds it; flat compression keeps the
  # first chunks and loses it.
  assert res["accuracy"] == {"compressed": 0.0, "truncated": 1.0}
  assert res["per_length"]["600"]["ratio"] > 1.5
  res = compress_eval.compression_eval(gen, None, None, tok, keyed, "passkey", [600],
                                       budget=300, **kw)
  assert res["accuracy"]["compressed"] == 1.0


def test_mixed_length_batches_equal_per_length_batches():
  """mix_lengths right-pads prompts of several lengths into one generate call (fewer
  compiles); a real model's greedy continuations must not change."""
  import jax
  import jax.numpy as jnp

  from ctxjax.eval import generate
  from ctxjax.model import Transformer, model_config_from_dict
  tok = CharTokenizer()
  model = Transformer(model_config_from_dict(dict(
      vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=2, head_dim=16, scan_layers=False,
      dtype="float32", initializer_range=1.0)))  # large weights: the prompt steers the output
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  need = retrieval.min_length(tok, "passkey")
  kwargs = dict(lengths=[need + 8, need + 40], depths=[0.0, 1.0], samples=1)
  per_length = retrieval.retrieval_grid(generate, model, variables, tok, "passkey",
                                        batch_size=2, **kwargs)
  mixed = retrieval.retrieval_grid(generate, model, variables, tok, "passkey", batch_size=4,
                                   mix_lengths=True, **kwargs)
  key = lambda r: (r["length"], r["depth"])
  predictions = [r["prediction"] for r in sorted(per_length["samples"], key=key)]
  assert len(set(predictions)) > 1  # continuations depend on the prompt: padding would show
  assert predictions == [r["prediction"] for r in sorted(mixed["samples"], key=key)]
  assert mixed["scores"] == per_length["scores"]
