"""benchmarks/memory.py (issue #15's benchmark): every arm's config is a valid model, landmark
rows are the plain rows with landmark ids inserted, and longmem trains on a rope base for two
steps with the backbone frozen and evaluates end to end. The real run is the benchmark itself."""
import importlib.util
import json
import os
import string
import sys
from unittest import mock

import jax
import numpy as np
import pytest

from ctxjax.agent.passkey_model import MODEL, PhraseTokenizer
from ctxjax.data import corpus
from ctxjax.model import model_config_from_dict

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "memory.py")
_SPEC = importlib.util.spec_from_file_location("benchmarks_memory", _PATH)
memory = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)  # for dataclasses
_SPEC.loader.exec_module(memory)

TOK = PhraseTokenizer()


def _cfg(name):
  arm = memory.ARMS.get(name)
  return model_config_from_dict({**MODEL, "vocab_size": TOK.vocab_size + arm.landmark,
                                 **memory.model_overrides(arm, TOK.vocab_size)})


@pytest.mark.parametrize("name", list(memory.ARMS))
def test_every_arm_builds_a_valid_model_config(name):
  cfg = _cfg(name)
  method = name.removesuffix("_ft")
  assert cfg.memory_kind == ({"memorizing", "fot", "longmem"} & {method} or {"none"}).pop()
  assert (cfg.attention_mode == "landmark") == (method == "landmark")


def test_fine_tuned_arms_start_from_rope_and_are_not_in_the_default_run():
  assert memory.DEFAULT_ARMS == ["rope", "rope_pi", "alibi", "landmark", "memorizing", "fot",
                                 "longmem"]
  for name in ("landmark_ft", "memorizing_ft", "fot_ft"):
    assert memory.ARMS.get(name).base == "rope"


def test_start_from_copies_shared_leaves_and_pads_a_larger_one():
  import jax.numpy as jnp  # noqa: PLC0415
  fresh = {"embed": jnp.zeros((3, 2)), "layer": {"w": jnp.zeros(2), "gate": jnp.ones(1)}}
  base = {"embed": jnp.ones((2, 2)), "layer": {"w": jnp.full(2, 5.0)}}
  out = memory.start_from(fresh, base)
  np.testing.assert_array_equal(out["embed"], [[1, 1], [1, 1], [0, 0]])
  np.testing.assert_array_equal(out["layer"]["w"], [5, 5])
  np.testing.assert_array_equal(out["layer"]["gate"], [1])


def test_unknown_arm_names_the_flag():
  with pytest.raises(ValueError, match="--arms.*valid choices"):
    memory.ARMS.get("ropee")


def test_landmark_rows_are_the_plain_rows_with_landmarks_every_mem_freq():
  plain = memory.training_rows(memory.ARMS.get("rope"), _cfg("rope"), TOK, 4)
  cfg = _cfg("landmark")
  rows = memory.training_rows(memory.ARMS.get("landmark"), cfg, TOK, 4)
  mem_freq = cfg.attention_options["mem_freq"]
  is_mark = np.arange(rows["inputs"].shape[1]) % (mem_freq + 1) == mem_freq
  assert (rows["inputs"][:, is_mark] == TOK.vocab_size).all()
  assert (rows["mask"][:, is_mark] == 0).all()
  for key in ("inputs", "targets", "mask"):  # the same content, in order
    np.testing.assert_array_equal(rows[key][:, ~is_mark], plain[key])
  np.testing.assert_array_equal(rows["positions"][0], np.arange(rows["inputs"].shape[1]))


@pytest.fixture(scope="module")
def chain():
  """longmem's initial parameters, and longmem trained 2 steps on that base (start_from)."""
  fresh = memory.build("longmem", TOK)[2]
  base = {"params": {k: v for k, v in fresh["params"].items() if not k.startswith("side_")}}
  run = memory.train_arm("longmem", TOK, steps=2, trained={"rope": {"variables": base}}, pool=8,
                         batch=4)
  return fresh["params"], run


def test_longmem_trains_only_its_side_network(chain):
  fresh, run = chain
  trained = run["variables"]["params"]
  assert set(trained) == set(fresh)
  frozen = [k for k in trained if not k.startswith("side_")]
  side = [k for k in trained if k.startswith("side_")]
  assert frozen and side
  jax.tree.map(np.testing.assert_array_equal, {k: trained[k] for k in frozen},
               {k: fresh[k] for k in frozen})  # the backbone, bit for bit
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves({k: trained[k] for k in side}),
      jax.tree.leaves({k: fresh[k] for k in side})))  # the side network did train


def test_an_arm_evaluates_end_to_end(chain):
  rows = memory.evaluate_arm("longmem", chain[1], TOK, [1], [0.5], 1, 1,
                             echo=lambda _: None)
  (row,) = rows
  assert row["length"] == memory.TRAIN_LENGTH and row["prompts_per_length"] == 1
  assert 0.0 <= row["passkey_accuracy"] <= 1.0
  assert row["program_bytes"] > 0 and row["tokens_per_sec"] > 0
  # the memory holds the whole prompt (+ bos and answer): 80 entries, 2 x 4 heads x 16 x 4 B
  # each, plus one 16-token window of both layers
  assert row["state_bytes"] == 512 * (80 + 2 * 16)


def test_demo_rows_mix_into_the_passkey_rows(tmp_path):
  """--demo_share: demo-corpus text as character tokens beside the passkey phrases, the passkey
  rows' ids unchanged by the extra characters."""
  tok = PhraseTokenizer(extra_chars=string.printable)
  assert tok.pieces[:TOK.vocab_size] == TOK.pieces  # the passkey ids stay the same
  data = tmp_path / "data"
  (data / corpus.CORPUS_NAME).mkdir(parents=True)
  text = "def f(x):\n\treturn x * 2  # \u00e9t\u00e9\n" * 20
  with open(data / corpus.CORPUS_NAME / corpus.JSONL_NAME, "w") as f:
    f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": "code"}}) + "\n")
  tokens, mask = memory.demo_rows(tok, 4, 30, data_dir=str(data))
  assert tokens.shape == (4, 30) and mask.shape == (4, 29) and mask.all()
  assert (tokens[:, 0] == tok.bos_id).all()
  decoded = tok.decode(tokens[0, 1:].tolist())
  assert len(decoded) == 29 and decoded in text.replace("\u00e9", "?")
  arm = memory.ARMS.get("rope")
  cfg = _cfg("rope")
  with mock.patch.object(memory, "demo_rows", lambda t, n, w: (np.full((n, w), 7, np.int32),
                                                               np.ones((n, w - 1), np.float32))):
    rows = memory.training_rows(arm, cfg, tok, 6, demo_share=0.25)
  assert rows["inputs"].shape[0] == 8  # 6 passkey rows + 2 demo rows = a quarter demo
  assert (rows["inputs"][6:] == 7).all() and (rows["inputs"][:6, 0] == tok.bos_id).all()
