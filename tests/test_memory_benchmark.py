"""benchmarks/memory.py (issue #15's benchmark): every arm's config is a valid model, landmark
rows are the plain rows with landmark ids inserted, and the rope -> longmem chain runs end to
end on a few steps with the backbone frozen. The real run is the benchmark itself."""
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import memory  # noqa: E402  (benchmarks/memory.py)

from ctxjax.agent.passkey_model import MODEL, PhraseTokenizer  # noqa: E402
from ctxjax.model import model_config_from_dict  # noqa: E402

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
  trained = {}
  for name in ("rope", "longmem"):
    trained[name] = memory.train_arm(name, TOK, steps=2, trained=trained, pool=32)
  return trained


def test_longmem_trains_only_its_side_network_on_the_rope_arm(chain):
  rope, longmem = (chain[k]["variables"]["params"] for k in ("rope", "longmem"))
  frozen = {k: v for k, v in longmem.items() if not k.startswith("side_")}
  assert set(frozen) == set(rope) and len(longmem) > len(rope)
  jax.tree.map(np.testing.assert_array_equal, frozen, rope)  # the backbone, bit for bit
  side = [k for k in longmem if k.startswith("side_")]
  fresh = memory.build("longmem", TOK)[2]["params"]
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves({k: longmem[k] for k in side}), jax.tree.leaves(
          {k: fresh[k] for k in side})))  # the side network did train


def test_an_arm_evaluates_end_to_end(chain):
  rows = memory.evaluate_arm("longmem", chain["longmem"], TOK, [1], [0.5], 1, 1,
                             echo=lambda _: None)
  (row,) = rows
  assert row["length"] == memory.TRAIN_LENGTH and row["prompts_per_length"] == 1
  assert 0.0 <= row["passkey_accuracy"] <= 1.0
  assert row["program_bytes"] > 0 and row["tokens_per_sec"] > 0
  # the memory holds the whole prompt (+ bos and answer): 80 entries, 2 x 4 heads x 16 x 4 B
  # each, plus one 16-token window of both layers
  assert row["state_bytes"] == 512 * (80 + 2 * 16)
