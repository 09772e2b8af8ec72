"""Params-only initialisation for continual pretraining: `train.init_from` (another ctxjax run)
and `train.init_from_hf` (a Hugging Face LLaMA directory)."""
import jax
import ml_collections
import numpy as np
import optax
import pytest

from ctxjax.model import Transformer, model_config_from_dict
from ctxjax.train import sharding
from ctxjax.train.checkpoint import Checkpointer
from ctxjax.train.init_from import initial_params
from ctxjax.train.step import init_state

B, T = 2, 16


def _state(model_dict, seed):
  cfg = model_config_from_dict(model_dict)
  mesh = sharding.create_mesh({})
  state, shardings = init_state(Transformer(cfg), optax.adam(1e-3), jax.random.PRNGKey(seed), B,
                                T, mesh=mesh, rules=sharding.DEFAULT_RULES)
  return cfg, state, shardings


def _train_cfg(**kw):
  return ml_collections.ConfigDict({"init_from": "", "init_from_hf": "", **kw})


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_init_from_another_run_takes_its_parameters_only(tmp_path, tiny_model_dict):
  cfg, saved, _ = _state(tiny_model_dict, seed=1)
  ckpt = Checkpointer(tmp_path / "old", save_every=1, keep=1, async_save=False)
  ckpt.save(7, saved, data_state={"stage": 0, "data": {}}, meta={"model_config": cfg.to_dict()},
            force=True)
  ckpt.close()

  # A continued run may change positional settings (here rope_theta: ABF), not the architecture.
  cfg2, fresh, shardings = _state({**tiny_model_dict, "rope_theta": 5e5}, seed=2)
  params = initial_params(_train_cfg(init_from=str(tmp_path / "old")), fresh.params,
                          shardings.params, cfg2)
  _assert_trees_equal(params, saved.params)
  leaf = jax.tree.leaves(params)[0]
  assert leaf.sharding == jax.tree.leaves(shardings.params)[0]

  cfg3, other, other_shardings = _state({**tiny_model_dict, "num_hidden_layers": 3}, seed=0)
  with pytest.raises(ValueError, match="num_hidden_layers: 2 -> 3"):
    initial_params(_train_cfg(init_from=str(tmp_path / "old")), other.params,
                   other_shardings.params, cfg3)
  with pytest.raises(ValueError, match="no checkpoint"):
    initial_params(_train_cfg(init_from=str(tmp_path / "nothing")), fresh.params,
                   shardings.params, cfg2)
  with pytest.raises(ValueError, match="choose one"):
    initial_params(_train_cfg(init_from="a", init_from_hf="b"), fresh.params, shardings.params,
                   cfg2)


@pytest.mark.hf
def test_init_from_hf_equals_the_imported_weights(tmp_path, tiny_model_dict):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from ctxjax import hf
  d = tiny_model_dict
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
      num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
      head_dim=d["head_dim"], max_position_embeddings=d["max_position_embeddings"],
      rms_norm_eps=1e-6, tie_word_embeddings=False))
  hf_model.save_pretrained(tmp_path / "hf")

  cfg, fresh, shardings = _state({**d, "rms_norm_eps": 1e-6}, seed=0)
  params = initial_params(_train_cfg(init_from_hf=str(tmp_path / "hf")), fresh.params,
                          shardings.params, cfg)
  _, expected = hf.load(tmp_path / "hf", scan_layers=True)
  _assert_trees_equal(params, expected["params"])

  # LongQLoRA from HF weights: kernels quantized on load, adapters kept at their init.
  from ctxjax.model import params as params_lib
  qcfg, qfresh, qshardings = _state({**d, "rms_norm_eps": 1e-6, "base_quantization": "nf4",
                                     "quant_block_size": 8, "lora_rank": 4}, seed=0)
  qparams = params_lib.flatten(initial_params(_train_cfg(init_from_hf=str(tmp_path / "hf")),
                                        qfresh.params, qshardings.params, qcfg))
  want = params_lib.flatten(params_lib.quantize_params(expected["params"], qcfg))
  assert set(qparams) - set(want) == {p for p in qparams if "/lora_" in p}
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(qparams[path]), np.asarray(value), err_msg=path)

  cfg_wide, wide, wide_shardings = _state({**d, "intermediate_size": 96}, seed=0)
  with pytest.raises(ValueError, match="intermediate_size: 64 -> 96"):
    initial_params(_train_cfg(init_from_hf=str(tmp_path / "hf")), wide.params,
                   wide_shardings.params, cfg_wide)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_init_from_float_run_into_quantized_lora_model(tmp_path, tiny_model_dict, kind):
  """LongQLoRA's start: a float run's kernels are quantized on load (codes + absmax equal to
  quantizing the saved kernels), every other tensor is taken as is, the new adapters keep
  their initialisation (B = 0: the model starts as the quantized base)."""
  from ctxjax.model import params as params_lib
  cfg, saved, _ = _state(tiny_model_dict, seed=1)
  ckpt = Checkpointer(tmp_path / "old", save_every=1, keep=1, async_save=False)
  ckpt.save(3, saved, data_state={"stage": 0, "data": {}}, meta={"model_config": cfg.to_dict()},
            force=True)
  ckpt.close()

  qcfg, fresh, shardings = _state({**tiny_model_dict, "base_quantization": kind,
                                   "quant_block_size": 8, "lora_rank": 4}, seed=2)
  params = initial_params(_train_cfg(init_from=str(tmp_path / "old")), fresh.params,
                          shardings.params, qcfg)
  got = params_lib.flatten(params)
  want = params_lib.flatten(params_lib.quantize_params(saved.params, qcfg))
  adapters = [p for p in got if p.endswith(("/lora_a", "/lora_b"))]
  assert adapters and set(got) == set(want) | set(adapters)
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=path)
  fresh_flat = params_lib.flatten(fresh.params)
  for path in adapters:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(fresh_flat[path]))
  by_path = params_lib.flatten(shardings.params)
  assert all(got[p].sharding == by_path[p] for p in got)
