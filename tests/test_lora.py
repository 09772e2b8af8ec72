"""LoRA / LongLoRA / LongQLoRA (ctxjax/model/lora.py, ctxjax/train/trainable.py, optim.py):
fresh adapters change nothing, merged kernels reproduce the adapter model, only the filtered
parameters train and only they hold optimizer state, the quantized base stays bit-identical,
and a merged export (also from a training run's checkpoint) loads in transformers."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import lora_cases as cases
from ctxjax.model import Transformer, lora
from ctxjax.model import params as params_lib
from ctxjax.model.layers import block_projection
from ctxjax.train import trainable
from ctxjax.train.optim import make_optimizer
from ctxjax.train.step import TrainState, make_train_step

LORA = dict(lora_rank=4, lora_alpha=8.0, lora_targets=list(lora.BLOCK_PROJECTIONS))
LONGLORA = ["lora_", "embed_tokens", "norm"]  # LongLoRA's trainable "embed,norm" + adapters
# A LongQLoRA layout: NF4 base, adapters on q and v only, one unrolled layer.
QLORA = dict(scan_layers=False, num_hidden_layers=1, base_quantization="nf4", lora_rank=4,
             lora_targets=["q_proj", "v_proj"])
B, T = 2, 16


def _optim(trainable_patterns):
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0, b1=0.9,
      b2=0.95, grad_clip_norm=1.0, trainable=trainable_patterns))


def _batch(seed=0):
  rows = np.asarray(cases.tokens(B, T + 1, seed))
  return dict(inputs=rows[:, :-1], targets=rows[:, 1:], loss_mask=np.ones((B, T), np.float32),
              positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
              segment_ids=np.ones((B, T), np.int32))


@pytest.fixture(scope="module")
def base():
  cfg = cases.config()
  return cfg, cases.random_params(cfg, std=0.1), jax.jit(Transformer(cfg).apply)


@pytest.fixture(scope="module")
def adapted(base):
  """The base with trained-looking adapters (random A and B) on every block projection."""
  cfg = cases.config(**LORA)
  params = params_lib.flatten(params_lib.init_from_base(base[1], cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(1)
  for path in [p for p in params if p.endswith("/lora_b")]:
    params[path] = jnp.asarray(rng.normal(0, 0.1, params[path].shape), jnp.float32)
  return cfg, params_lib.unflatten(params), jax.jit(Transformer(cfg).apply)


def test_fresh_adapters_leave_the_model_exactly_unchanged(base, adapted):
  cfg, params, apply = base
  lcfg, _, lora_apply = adapted
  fresh = params_lib.init_from_base(params, lcfg, jax.random.PRNGKey(0))
  per_layer = ((32 * 4 + 4 * 32) + 2 * (32 * 4 + 4 * 16) + (32 * 4 + 4 * 32)  # q, k, v, o
               + 2 * (32 * 4 + 4 * 64) + (64 * 4 + 4 * 32))  # gate, up, down
  assert params_lib.count(fresh, "lora_") == 2 * per_layer == 4096
  out = lora_apply({"params": fresh}, cases.tokens())
  np.testing.assert_array_equal(out, apply({"params": params}, cases.tokens()))


class _QO(nn.Module):
  """A q_proj (one contraction dim) and an o_proj (two) side by side."""
  cfg: object

  @nn.compact
  def __call__(self, x):
    q = block_projection(self.cfg, "q_proj", (32, 4, 8), ("embed", "heads", "head_dim"))(x)
    return block_projection(self.cfg, "o_proj", (4, 8, 32), ("heads", "head_dim", "embed"),
                            n_in=2)(q)


def test_adapter_init_and_logical_names():
  cfg = cases.config(lora_rank=8, lora_targets=["q_proj", "o_proj"])
  boxed = jax.jit(_QO(cfg).init)(jax.random.PRNGKey(0), jnp.ones((1, 32)))["params"]
  for name, shape, names, n_in in (("q_proj", (32, 4, 8), ("embed", "heads", "head_dim"), 1),
                                   ("o_proj", (4, 8, 32), ("heads", "head_dim", "embed"), 2)):
    assert boxed[name]["lora_a"].names == (*names[:n_in], None)
    assert boxed[name]["lora_b"].names == (None, *names[n_in:])
    a, b = np.asarray(boxed[name]["lora_a"].value), np.asarray(boxed[name]["lora_b"].value)
    assert a.shape == (*shape[:n_in], 8) and b.shape == (8, *shape[n_in:]) and not b.any()
    bound = 1 / np.sqrt(32)  # PEFT's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound


@pytest.mark.parametrize("variant", ["scanned", "unrolled_nf4_qv"])
def test_merged_kernels_reproduce_the_adapter_model(base, adapted, variant):
  if variant == "scanned":
    cfg, params, apply = adapted
    plain_apply = base[2]
  else:
    cfg = cases.config(**QLORA)
    params = params_lib.flatten(params_lib.init_from_base(
        cases.random_params(params_lib.base_config(cfg), std=0.1), cfg, jax.random.PRNGKey(0)))
    for path in [p for p in params if p.endswith("/lora_b")]:
      params[path] = jnp.full(params[path].shape, 0.05)
    params, apply = params_lib.unflatten(params), jax.jit(Transformer(cfg).apply)
    plain_apply = jax.jit(Transformer(params_lib.base_config(cfg)).apply)
  merged = params_lib.merge_lora(params, cfg)
  assert jax.tree.map(jnp.shape, merged) == jax.tree.map(
      jnp.shape, params_lib.unflatten(params_lib.abstract_params(params_lib.base_config(cfg))))
  want = apply({"params": params}, cases.tokens())
  got = plain_apply({"params": merged}, cases.tokens())
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-5
  # The adapters matter: without them the logits move far more than the tolerance.
  unmerged = {k: v for k, v in params_lib.flatten(params).items() if "lora_" not in k}
  no_adapters = plain_apply({"params": params_lib.merge_lora(params_lib.unflatten(unmerged), cfg)},
                            cases.tokens())
  assert float(jnp.max(jnp.abs(no_adapters - want))) > 0.05


def test_adapter_dropout_only_when_training():
  cfg = cases.config(lora_rank=4, lora_dropout=0.5, lora_targets=["q_proj"])
  x = jnp.ones((64, 32))
  names = ("embed", "heads", "head_dim")
  params = {"kernel": jnp.zeros((32, 4, 8)), "lora_a": jnp.ones((32, 4)),
            "lora_b": jnp.ones((4, 4, 8))}
  apply = lambda training, **kw: block_projection(cfg, "q_proj", (32, 4, 8), names,
                                                  training=training).apply({"params": params},
                                                                           x, **kw)
  scale = 16.0 / 4 * 4  # alpha (default 16) / r, times r (A and B all ones)
  np.testing.assert_array_equal(apply(False), scale * 32)
  with pytest.raises(ValueError, match="lora_dropout=0.5 needs a 'dropout' PRNG"):
    apply(True)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  y1 = np.asarray(apply(True, rngs={"dropout": k1}))
  np.testing.assert_array_equal(y1, apply(True, rngs={"dropout": k1}))
  assert not np.array_equal(y1, apply(True, rngs={"dropout": k2}))
  # Inverted dropout of the input: each row is scale * (kept inputs) / (1 - 0.5).
  kept = y1[:, 0, 0] / (2 * scale)
  np.testing.assert_array_equal(kept, np.round(kept))
  assert np.all(y1 == y1[:, :1, :1]) and 12 < kept.mean() < 20  # ~16 of 32 kept


def test_trainable_mask_and_errors(adapted):
  cfg, params, _ = adapted
  mask = params_lib.flatten(trainable.trainable_mask(params, LONGLORA))
  chosen = sorted(p for p, m in mask.items() if m)
  assert chosen == sorted(p for p in mask if "lora_" in p or p.endswith("scale")
                          or p == "embed_tokens/embedding")
  assert not mask["lm_head/kernel"] and not mask["layers/layer/self_attn/q_proj/kernel"]
  assert all(params_lib.flatten(trainable.trainable_mask(params, [])).values())
  with pytest.raises(ValueError, match="pattern 'attn_bias' matches no parameter"):
    trainable.trainable_mask(params, ["lora_", "attn_bias"])
  with pytest.raises(ValueError, match="not a valid regex"):
    trainable.trainable_mask(params, ["lora_("])
  qcfg = cases.config(base_quantization="int8", **LORA)
  qparams = params_lib.unflatten(params_lib.abstract_params(qcfg))  # shapes and dtypes suffice
  with pytest.raises(ValueError, match="selects the frozen quantized base"):
    trainable.trainable_mask(qparams, ["lora_", "kernel"])
  qmask = params_lib.flatten(trainable.trainable_mask(qparams, []))
  assert not any(m for p, m in qmask.items() if "kernel_int8" in p or "kernel_absmax" in p)


@pytest.fixture(scope="module")
def trained(adapted):
  """Two steps of the trainer's own train step (ctxjax/train/step.py) with LongLoRA's filter
  and S2-Attn (group 4 of 16 tokens) in training."""
  cfg = cases.config(**LORA, attention_mode="s2", attention_options={"group_size": 4})
  tx, _ = make_optimizer(_optim(LONGLORA), 10)
  before = jax.tree.map(np.asarray, adapted[1])
  params = jax.tree.map(jnp.asarray, before)  # fresh buffers: the step donates its state
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=jax.jit(tx.init)(params), rng=jax.random.PRNGKey(0))
  step = make_train_step(Transformer(cfg), tx, ml_collections.ConfigDict({}))
  for seed in range(2):
    state, metrics = step(state, _batch(seed))
  return cfg, tx, before, state


def test_only_filtered_parameters_change_and_hold_optimizer_state(trained):
  cfg, tx, before, state = trained
  mask = params_lib.flatten(trainable.trainable_mask(before, LONGLORA))
  after = params_lib.flatten(state.params)
  for path, old in params_lib.flatten(before).items():
    changed = bool(np.any(np.asarray(after[path]) != old))
    assert changed == mask[path], path  # weight decay is 0: every change comes from gradients
  n_trainable = sum(np.size(x) for p, x in params_lib.flatten(before).items() if mask[p])
  n_all = sum(np.size(x) for x in jax.tree.leaves(before))
  moments = lambda s: sum(np.size(x) for x in jax.tree.leaves(s) if np.ndim(x) > 0)
  assert moments(state.opt_state) == 2 * n_trainable  # Adam's mu and nu, trainable leaves only
  full_tx, _ = make_optimizer(_optim([]), 10)
  assert moments(jax.eval_shape(full_tx.init, before)) == 2 * n_all
  assert n_trainable < n_all / 3


def test_optimizer_state_shards_like_the_parameters(adapted):
  """The trainer places the optimizer state with flax's logical-axis shardings: the filtered
  state must map onto them (optax.masked's MaskedNode placeholders would not)."""
  from ctxjax.train import sharding
  cfg = adapted[0]
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                         jax.ShapeDtypeStruct((1, T), jnp.int32))["params"]
  tx, _ = make_optimizer(_optim(LONGLORA), 10)
  opt_state = jax.eval_shape(tx.init, boxed)
  shardings = sharding.logical_to_shardings(opt_state, sharding.create_mesh({}),
                                            sharding.DEFAULT_RULES)
  placed = jax.tree.map(lambda x, s: (x.shape, s.spec), nn.meta.unbox(opt_state), shardings)
  mu = params_lib.flatten(placed[1][0].mu)
  assert mu["layers/layer/self_attn/q_proj/kernel"] is None  # frozen: no moment
  assert mu["layers/layer/self_attn/q_proj/lora_b"][0] == (2, 4, 4, 8)


def test_quantized_base_stays_bit_identical_under_training():
  """LongQLoRA: only the adapters and norms train; int codes never reach jax.grad."""
  cfg = cases.config(**QLORA)
  params = params_lib.init_from_base(cases.random_params(params_lib.base_config(cfg), std=0.1), cfg,
                               jax.random.PRNGKey(0))
  patterns = ["lora_", "norm"]
  tx, _ = make_optimizer(_optim(patterns), 10)
  model = Transformer(cfg)
  mask = trainable.trainable_mask(params, patterns)

  def loss(p, batch):
    logits = model.apply({"params": p}, batch["inputs"], train=True)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits),
                                         batch["targets"][..., None], -1))

  @jax.jit
  def step(p, opt_state, batch):
    value, grads = trainable.value_and_grad(loss, mask)(p, batch)
    updates, opt_state = tx.update(grads, opt_state, p)
    return jax.tree.map(lambda x, u: x + u.astype(x.dtype), p, updates), opt_state, grads

  opt_state = jax.jit(tx.init)(params)
  assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(opt_state)
             if np.ndim(x) > 0)
  new, opt_state, grads = step(params, opt_state, _batch())
  new, opt_state, grads = step(new, opt_state, _batch(1))
  flat_old, flat_new, flat_grads = (params_lib.flatten(t) for t in (params, new, grads))
  for path, old in flat_old.items():
    if "lora_" in path or "norm" in path:
      assert np.any(np.asarray(flat_new[path]) != np.asarray(old)), path
      assert np.any(np.asarray(flat_grads[path])), path  # gradients reach lora_a and lora_b
    else:
      assert flat_new[path].dtype == old.dtype
      np.testing.assert_array_equal(flat_new[path], old, err_msg=path)
      assert not np.any(np.asarray(flat_grads[path])), path


def test_export_from_a_training_checkpoint_merges_adapters(trained, tmp_path):
  pytest.importorskip("safetensors")
  from safetensors.numpy import load_file
  from ctxjax import export_hf, hf
  from ctxjax.train.checkpoint import Checkpointer
  cfg, _, _, state = trained
  ckpt = Checkpointer(tmp_path / "run", save_every=1, keep=1, async_save=False)
  ckpt.save(2, state, data_state={"stage": 0, "data": {}},
            meta={"model_config": cfg.to_dict()}, force=True)
  ckpt.close()
  model, variables, token_ids = export_hf.read_workdir(str(tmp_path / "run"))
  assert model.cfg == cfg and token_ids is None
  jax.tree.map(np.testing.assert_array_equal, variables["params"],
               jax.tree.map(np.asarray, state.params))
  hf.save(model, variables, tmp_path / "from_run")
  hf.save(Transformer(params_lib.base_config(cfg)),
          {"params": params_lib.merge_lora(state.params, cfg)}, tmp_path / "direct")
  got, want = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("from_run", "direct"))
  assert sorted(got) == sorted(want) and not any("lora" in k for k in got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  exported = json.loads((tmp_path / "from_run" / "config.json").read_text())
  assert exported["architectures"] == ["LlamaForCausalLM"]
  with pytest.raises(ValueError, match=r"--step=9: .* has steps \[2\]"):
    export_hf.read_workdir(str(tmp_path / "run"), step=9)


def _sentencepiece(tmp_path):
  from ctxjax.data.tokenizer import train_tokenizer
  text = "def f(x):\n    return x + 1\n# a comment about numbers 12345\n" * 40
  jsonl = tmp_path / "corpus.jsonl"
  jsonl.write_text("".join(json.dumps({"text": text + str(i), "meta": {
      "redpajama_set_name": "code"}}) + "\n" for i in range(20)))
  return train_tokenizer(str(jsonl), str(tmp_path / "spm"), vocab_size=300)


@pytest.mark.hf
def test_merged_export_loads_in_transformers(adapted, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from ctxjax import hf
  transformers.logging.set_verbosity_error()
  cfg, params, apply = adapted
  tok = _sentencepiece(tmp_path)
  hf.save(Transformer(cfg), {"params": params}, tmp_path / "out", tokenizer_model=tok.path)
  torch_model = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  tokens = np.array(cases.tokens())  # a writable copy: torch.from_numpy needs one
  with torch.no_grad():
    theirs = torch_model(torch.from_numpy(tokens)).logits.float().numpy()
  ours = np.asarray(apply({"params": params}, jnp.asarray(tokens)))
  assert np.abs(ours - theirs).max() < 1e-4

  tok_cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
  assert tok_cfg["tokenizer_class"] == "LlamaTokenizer"
  assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"],
          tok_cfg["unk_token"]) == ("<s>", "</s>", "<pad>", "<unk>")
  assert tok_cfg["model_max_length"] == cfg.max_position_embeddings
  assert tok_cfg["add_prefix_space"] is False  # ctxjax tokenizers add no dummy prefix
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  text = "def f(y):\n    return y + 12\n"
  assert auto(text)["input_ids"] == [tok.bos_id] + tok.encode(text)
  assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (2, 3, 0)


def test_bad_lora_config_names_the_key():
  with pytest.raises(ValueError, match=r"lora_targets=\['q_proj', 'qkv'\].*'gate_proj'"):
    cases.config(lora_rank=4, lora_targets=["q_proj", "qkv"])
  with pytest.raises(ValueError, match="lora_rank must be an integer >= 0"):
    cases.config(lora_rank=-1)
  with pytest.raises(ValueError, match=r"lora_dropout must lie in \[0, 1\)"):
    cases.config(lora_dropout=1.0)
  with pytest.raises(ValueError, match="lora_alpha must be a number > 0"):
    cases.config(lora_alpha=0)
  assert cases.config(lora_rank=2, lora_targets=["v_proj", "q_proj"]).lora_targets == (
      "q_proj", "v_proj")
