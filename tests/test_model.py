"""The decoder: every scheme runs and trains, packing isolates documents, positions are data,
scan/remat are exact re-expressions, bad configs and inputs fail at the boundary."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.model import Transformer, model_config_from_dict
from ctxjax.model.flops import param_count
from ctxjax.positions import schemes

SCHEME_OVERRIDES = {
    "rope": {},
    "rope_yarn": dict(position_embedding_type="rope", rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32)),
    "rope_dynamic": dict(position_embedding_type="rope", rope_scaling=dict(
        rope_type="dynamic", factor=2.0)),
    "rope_longrope": dict(position_embedding_type="rope", rope_scaling=dict(
        rope_type="longrope", original_max_position_embeddings=32,
        short_factor=[1.0] * 4, long_factor=[1.0, 1.5, 2.0, 4.0])),
    "alibi": dict(position_embedding_type="alibi"),
    "xpos": dict(position_embedding_type="xpos"),
    "sinusoidal": dict(position_embedding_type="sinusoidal"),
    "learned": dict(position_embedding_type="learned"),
    "none": dict(position_embedding_type="none"),
}


def _build(base, **overrides):
  cfg = model_config_from_dict({**base, **overrides})
  model = Transformer(cfg)
  tokens = jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) % cfg.vocab_size
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
  return cfg, model, params


def _rows(batch, length, seed=0, vocab=64):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, vocab, jnp.int32)


@pytest.mark.parametrize("name", sorted(SCHEME_OVERRIDES))
def test_every_scheme_runs_and_gradients_reach_every_parameter(tiny_model_dict, name):
  cfg, model, params = _build(tiny_model_dict, **SCHEME_OVERRIDES[name])
  tokens = _rows(2, 16)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))

  def loss(p):
    logits = model.apply({"params": p}, tokens, positions, jnp.ones_like(tokens))
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.max(jnp.abs(g))) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
  assert sum(x.size for x in jax.tree.leaves(params)) == param_count(cfg)["total"]


@pytest.mark.parametrize("name", ["rope", "alibi", "xpos", "none"])
def test_relative_schemes_are_invariant_to_a_position_shift(tiny_model_dict, name):
  _, model, params = _build(tiny_model_dict, **SCHEME_OVERRIDES[name])
  tokens = _rows(2, 16, seed=1)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  apply = jax.jit(lambda pos: model.apply({"params": params}, tokens, pos, jnp.ones_like(tokens)))
  np.testing.assert_allclose(apply(positions), apply(positions + 37), atol=2e-5)


def test_absolute_schemes_do_depend_on_absolute_position(tiny_model_dict):
  _, model, params = _build(tiny_model_dict, position_embedding_type="sinusoidal")
  tokens = _rows(1, 16)
  pos = jnp.arange(16)[None]
  apply = jax.jit(lambda p: model.apply({"params": params}, tokens, p, jnp.ones_like(tokens)))
  a, b = apply(pos), apply(pos + 5)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.mark.parametrize("name", ["rope", "alibi", "xpos", "learned"])
def test_packed_documents_do_not_attend_across_segments(tiny_model_dict, name):
  """Logits of each document inside a packed row equal the document run alone."""
  _, model, params = _build(tiny_model_dict, **SCHEME_OVERRIDES[name])
  doc_a, doc_b = _rows(1, 5, seed=2), _rows(1, 11, seed=3)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  positions = jnp.concatenate([jnp.arange(5), jnp.arange(11)])[None]
  segments = jnp.concatenate([jnp.ones(5, jnp.int32), jnp.full(11, 2, jnp.int32)])[None]
  apply = jax.jit(lambda *a: model.apply({"params": params}, *a))
  packed_logits = apply(packed, positions, segments)
  alone_a = apply(doc_a, jnp.arange(5)[None], jnp.ones_like(doc_a))
  alone_b = apply(doc_b, jnp.arange(11)[None], jnp.ones_like(doc_b))
  np.testing.assert_allclose(packed_logits[:, :5], alone_a, atol=1e-5)
  np.testing.assert_allclose(packed_logits[:, 5:], alone_b, atol=1e-5)


def test_scan_and_unrolled_layers_compute_the_same_function(tiny_model_dict):
  cfg, model, params = _build(tiny_model_dict)
  unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
  unrolled = dict(params)
  stacked = unrolled.pop("layers")["layer"]
  for i in range(cfg.num_hidden_layers):
    unrolled[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  tokens = _rows(2, 16, seed=4)
  a = jax.jit(model.apply)({"params": params}, tokens)
  b = jax.jit(Transformer(unrolled_cfg).apply)({"params": unrolled}, tokens)
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_changes_memory_not_gradients(tiny_model_dict, policy):
  cfg, model, params = _build(tiny_model_dict)
  remat_model = Transformer(dataclasses.replace(cfg, remat_policy=policy))
  tokens = _rows(2, 16, seed=5)
  loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)
  g1 = jax.jit(jax.grad(loss(model)))(params)
  g2 = jax.jit(jax.grad(loss(remat_model)))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_parameters_carry_logical_axis_names(tiny_model_dict):
  cfg = model_config_from_dict(tiny_model_dict)
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), _rows(1, 8))["params"]
  specs = jax.tree.map(tuple, nn.get_partition_spec(boxed),
                       is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert specs["embed_tokens"]["embedding"] == ("vocab", "embed")
  attn = specs["layers"]["layer"]["self_attn"]
  assert attn["q_proj"]["kernel"] == ("layers", "embed", "heads", "head_dim")
  assert attn["k_proj"]["kernel"] == ("layers", "embed", "kv_heads", "head_dim")
  assert attn["o_proj"]["kernel"] == ("layers", "heads", "head_dim", "embed")
  assert specs["layers"]["layer"]["mlp"]["down_proj"]["kernel"] == ("layers", "mlp", "embed")
  assert specs["lm_head"]["kernel"] == ("embed", "vocab")


def test_tied_embeddings_share_the_table(tiny_model_dict):
  cfg, model, params = _build(tiny_model_dict, tie_word_embeddings=True)
  assert "lm_head" not in params and param_count(cfg)["head"] == 0
  # Scaling one output row of the shared table scales exactly that vocab entry's logit.
  tokens = jnp.array([[1, 2, 3, 4]])
  table = params["embed_tokens"]["embedding"]
  edited = {**params, "embed_tokens": {"embedding": table.at[7].multiply(2.0)}}
  apply = jax.jit(model.apply)
  a, b = apply({"params": params}, tokens), apply({"params": edited}, tokens)
  np.testing.assert_allclose(b[..., 7], 2 * a[..., 7], rtol=1e-5)
  np.testing.assert_allclose(b[..., :7], a[..., :7], rtol=1e-6)


@pytest.mark.parametrize("overrides, key", [
    (dict(position_embedding_type="rotary"), "position_embedding_type"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "original_max_position_embeddings"),
    (dict(rope_scaling=dict(rope_type="linear", factor=-2.0)), "factor"),
    (dict(rope_scaling=dict(rope_type="warp", factor=2.0)), "rope_type"),
    (dict(position_embedding_type="alibi", rope_scaling=dict(rope_type="linear", factor=2.0)),
     "rope_scaling"),
    (dict(dtype="float8"), "dtype"),
    (dict(attention_impl="magic"), "attention_impl"),
    (dict(attention_pattern=dict(kind="zigzag")), "attention_pattern"),
    (dict(hidden_sizes=3), "unknown model config keys"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_configs_name_the_key(tiny_model_dict, overrides, key):
  with pytest.raises(ValueError, match=key):
    model_config_from_dict({**tiny_model_dict, **overrides})


def test_bad_inputs_are_refused(tiny_model_dict):
  cfg, model, params = _build(tiny_model_dict)
  with pytest.raises(ValueError, match="vocab_size"):
    model.apply({"params": params}, jnp.full((1, 4), cfg.vocab_size, jnp.int32))
  with pytest.raises(ValueError, match="vocab_size"):
    model.apply({"params": params}, jnp.full((1, 4), -1, jnp.int32))
  _, model, params = _build(tiny_model_dict, position_embedding_type="learned")
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model.apply({"params": params}, _rows(1, 4), jnp.array([[0, 1, 2, 128]]))


def test_every_registered_scheme_is_covered():
  covered = {SCHEME_OVERRIDES[k].get("position_embedding_type", "rope") for k in SCHEME_OVERRIDES}
  assert covered == set(schemes.SCHEMES)


@pytest.mark.parametrize("name, pattern", [
    ("rope", dict(kind="causal")), ("alibi", dict(kind="causal")),
    ("xpos", dict(kind="sliding_window", window=100))])
def test_attention_impl_changes_speed_not_the_loss(tiny_model_dict, name, pattern):
  """Switching model.attention_impl must leave loss and gradients unchanged."""
  base = {**tiny_model_dict, **SCHEME_OVERRIDES[name], "attention_pattern": pattern}
  length = 768  # > the blockwise kernel's 256 default block: several blocks, some skipped
  tokens = _rows(2, length, seed=6)
  positions = jnp.broadcast_to(jnp.arange(length), (2, length))
  segments = jnp.concatenate([jnp.ones((2, 300), jnp.int32),
                              jnp.full((2, length - 300), 2, jnp.int32)], 1)
  results = []
  for impl in ("reference", "blockwise"):
    cfg, model, params = _build({**base, "attention_impl": impl})
    if results:
      params = results[0][2]  # same weights for both kernels
    loss = lambda p: jnp.mean(jax.nn.log_softmax(
        model.apply({"params": p}, tokens, positions, segments))[..., 3])
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    results.append((value, grads, params))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


MODE_OVERRIDES = {
    "s2": dict(attention_mode="s2", attention_options=dict(group_size=8)),
    "dilated": dict(attention_mode="dilated", attention_impl="blockwise",
                    attention_options=dict(segment_lengths=[8, 16], dilation_rates=[1, 2])),
    "lm_infinite": dict(attention_mode="lm_infinite",
                        attention_options=dict(n_global=2, n_local=6)),
    "lambda_pattern": dict(attention_pattern=dict(kind="lambda", n_global=2, n_local=6)),
}


@pytest.mark.parametrize("name", sorted(MODE_OVERRIDES))
def test_attention_modes_train_and_s2_is_training_only(tiny_model_dict, name):
  cfg, model, params = _build(tiny_model_dict, **MODE_OVERRIDES[name])
  tokens = _rows(2, 32, seed=7)
  positions = jnp.broadcast_to(jnp.arange(32), (2, 32))
  run = jax.jit(lambda p, train: model.apply({"params": p}, tokens, positions,
                                             jnp.ones_like(tokens), train=train),
                static_argnums=1)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(run(p, True) ** 2)))(params)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
  standard = Transformer(model_config_from_dict(tiny_model_dict))
  causal = jax.jit(lambda p: standard.apply({"params": p}, tokens, positions))(params)
  if name == "s2":  # S2-Attn while training, full causal attention at inference (LongLoRA)
    assert float(jnp.max(jnp.abs(run(params, True) - causal))) > 1e-4
    np.testing.assert_allclose(run(params, False), causal, atol=1e-5)
  else:  # sparse patterns: the first tokens (which see every earlier key) match causal;
    # LongNet's dilated branches differ from position 1 on (odd keys go to other head groups)
    prefix = 1 if name == "dilated" else 6
    np.testing.assert_allclose(run(params, False)[:, :prefix], causal[:, :prefix], atol=1e-5)
    assert float(jnp.max(jnp.abs(run(params, False)[:, 20:] - causal[:, 20:]))) > 1e-4


@pytest.mark.parametrize("name", ["standard", "dilated", "lm_infinite"])
def test_default_kernel_is_auto_in_every_mode(tiny_model_dict, name):
  """A config that names no kernel gets `auto` (the fastest exact one), in every mode."""
  overrides = {k: v for k, v in MODE_OVERRIDES.get(name, {}).items() if k != "attention_impl"}
  cfg, model, params = _build(tiny_model_dict, **overrides)
  assert cfg.attention_impl == "auto"
  _, dense, _ = _build(tiny_model_dict, **overrides, attention_impl="reference")
  tokens = _rows(2, 32, seed=3)
  positions = jnp.broadcast_to(jnp.arange(32), (2, 32))
  run = lambda m: jax.jit(lambda p: m.apply({"params": p}, tokens, positions))(params)
  np.testing.assert_allclose(run(model), run(dense), atol=1e-5)


@pytest.mark.parametrize("overrides, key", [
    (dict(attention_mode="ring_of_fire"), "attention_mode"),
    (dict(attention_mode="s2"), "group_size"),
    (dict(attention_mode="s2", attention_options=dict(group_size=0)), "group_size"),
    (dict(attention_mode="dilated", attention_options=dict(segment_lengths=[8],
                                                           dilation_rates=[1, 2])), "same length"),
    (dict(attention_mode="lm_infinite", position_embedding_type="alibi",
          attention_options=dict(n_global=2, n_local=4)), "rotary"),
    (dict(attention_mode="dilated", attention_impl="xla",
          attention_options=dict(segment_lengths=[8], dilation_rates=[1])), "attention_impl"),
])
def test_bad_attention_modes_name_the_key(tiny_model_dict, overrides, key):
  with pytest.raises(ValueError, match=key):
    model_config_from_dict({**tiny_model_dict, **overrides})


@pytest.mark.parametrize("position_ids, promised", [
    ("data", True), ("pose", False), ("randomized", False)])
def test_packed_training_vouches_for_its_positions(monkeypatch, tiny_model_dict, position_ids,
                                                    promised):
  """The train step promises `attend` contiguous positions (what lets `auto` run splash on a
  TPU) for packed data only, never for PoSE / randomized ids; a model called without
  positions makes contiguous ones itself."""
  import optax  # noqa: PLC0415
  from ctxjax import attention  # noqa: PLC0415
  from ctxjax.train.step import init_state, make_train_step  # noqa: PLC0415
  model = Transformer(model_config_from_dict(tiny_model_dict))
  tx = optax.adamw(1e-3)
  state, _ = init_state(model, tx, jax.random.PRNGKey(0), 2, 16)
  seen, real = [], attention.attend
  monkeypatch.setattr(attention, "attend",
                      lambda *a, **kw: seen.append(kw["contiguous_positions"]) or real(*a, **kw))
  tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % 64
  batch = {"inputs": tokens, "targets": tokens, "segment_ids": np.ones_like(tokens),
           "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)),
           "loss_mask": np.ones(tokens.shape, np.float32)}
  make_train_step(model, tx, dict(position_ids=position_ids, max_position_id=64)).lower(
      state, batch)
  assert seen and set(seen) == {promised}
  seen.clear()
  jax.eval_shape(lambda p: model.apply({"params": p}, tokens), state.params)
  assert seen and set(seen) == {True}
