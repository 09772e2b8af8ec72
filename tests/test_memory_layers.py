"""Memory layers: kNN memory (Wu et al. 2022), Focused Transformer (Tworkowski et al. 2023),
LongMem (Wang et al. 2023). ctxjax/model/knn_memory.py, memory_layer.py, longmem.py,
memory_inference.py."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention.patterns import make_pattern
from ctxjax.attention.reference import reference_attention
from ctxjax.model import Transformer, knn_memory, memory_inference, memory_layer
from ctxjax.model.config import model_config_from_dict

B, H, K, D = 2, 4, 2, 8
WINDOW, T = 8, 32
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=H, num_key_value_heads=K, head_dim=D,
            max_position_embeddings=128, scan_layers=False, memory_window=WINDOW)
KINDS = {  # one layer where another would add compile time, not coverage
    "memorizing": dict(memory_layers=[0], memory_size=16, memory_neighbors=5,
                       num_hidden_layers=1),
    "fot": dict(memory_layers=[-1], memory_size=16, memory_cross_batch=1,
                num_hidden_layers=1),  # longmem's backbone: windowed layers without memory
    "longmem": dict(memory_layers=[0], memory_size=24, memory_neighbors=6, side_layers=1,
                    num_hidden_layers=1),
}


def _cfg(kind, **overrides):
  return model_config_from_dict({**BASE, "memory_kind": kind, **KINDS[kind], **overrides})


_write = jax.jit(knn_memory.write)


def _rand(key, *shape):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


def test_exact_knn_over_whole_context_equals_full_attention():
  s = 12
  q_BTHD, k_BSKD, v_BSKD = _rand(0, B, 5, H, D), _rand(1, B, s, K, D), _rand(2, B, s, K, D)
  want = jax.jit(reference_attention, static_argnames="pattern")(
      q_BTHD, k_BSKD, v_BSKD, q_positions=jnp.zeros((B, 5), jnp.int32),
                             k_positions=jnp.zeros((B, s), jnp.int32),
                             q_segment_ids=jnp.ones((B, 5), jnp.int32),
                             k_segment_ids=jnp.ones((B, s), jnp.int32),
                             pattern=make_pattern("full"))
  q = q_BTHD.reshape(B, 5, K, H // K, D)

  @jax.jit
  def search(mem):
    return knn_memory.attend(q, mem.keys_BMKD, mem.values_BMKD,
                             mem.valid_BM[:, None, None, None, :], scale=D ** -0.5, neighbours=s)
  out, _, visible = search(_write(knn_memory.init(B, s, K, D), k_BSKD, v_BSKD))
  assert bool(visible.all())
  np.testing.assert_allclose(out.reshape(B, 5, H, D), want, atol=2e-6, rtol=1e-5)


def test_top_k_keeps_only_the_nearest_entries():
  q = _rand(3, 1, 1, 1, 1, D)
  keys = _rand(4, 1, 10, 1, D)
  values = jnp.eye(10).reshape(1, 10, 1, 10)  # entry i's value marks coordinate i

  @jax.jit
  def outs():
    return [knn_memory.attend(q, keys, values, True, scale=1.0, neighbours=n)[0]
            for n in (3, 30, 0)]
  out, few, every = outs()
  logits = np.asarray(keys[0, :, 0] @ q[0, 0, 0, 0])
  np.testing.assert_array_equal(np.flatnonzero(out[0, 0, 0, 0]), np.sort(np.argsort(-logits)[:3]))
  # More neighbours than entries (a short training row): all of them, as without a search.
  np.testing.assert_allclose(few, every, rtol=1e-6)


def test_fifo_eviction_keeps_the_newest_entries_oldest_first():
  def entries(lo, hi):  # entry i has key = value = i
    x = jnp.arange(lo, hi, dtype=jnp.float32).reshape(1, -1, 1, 1)
    return x, x
  mem = knn_memory.init(1, 4, 1, 1)
  mem = _write(mem, *entries(0, 3))
  np.testing.assert_array_equal(mem.valid_BM[0], [True, True, True, False])
  mem = _write(mem, *entries(3, 6))  # 6 written into 4 slots: 0 and 1 evicted
  view = knn_memory.ordered(mem)
  np.testing.assert_array_equal(view.keys_BMKD[0, :, 0, 0], [2, 3, 4, 5])
  np.testing.assert_array_equal(view.values_BMKD[0, :, 0, 0], [2, 3, 4, 5])
  assert int(mem.written) == 6 and bool(mem.valid_BM.all())
  once = knn_memory.ordered(_write(knn_memory.init(1, 4, 1, 1), *entries(0, 7)))
  np.testing.assert_array_equal(once.keys_BMKD[0, :, 0, 0], [3, 4, 5, 6])


def test_cross_batch_rows_and_negative_mask_by_hand():
  np.testing.assert_array_equal(memory_layer.cross_batch_rows(3, 1), [[0, 1], [1, 2], [2, 0]])
  with pytest.raises(ValueError, match="memory_cross_batch=3"):
    memory_layer.cross_batch_rows(3, 3)
  # T = 6 as 3 windows of 2, memory of 2 entries (the previous window), one negative row.
  # Row 0 is one document; row 1 holds two documents (a new one starts at t = 3).
  segments = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2]])
  mask = np.asarray(memory_layer.training_memory_mask(segments, 2, 2, 1))
  assert mask.shape == (2, 6, 2, 6)  # [B, T, R = self + 1 negative, S]
  prev = np.zeros((6, 6), bool)  # t in window c sees keys of window c - 1
  prev[2:4, 0:2] = prev[4:6, 2:4] = True
  np.testing.assert_array_equal(mask[0, :, 0], prev)  # positives: own previous window
  np.testing.assert_array_equal(mask[0, :, 1], prev)  # negatives: the other row's, all docs
  own_doc = prev.copy()
  own_doc[3, 0:2] = False   # t = 3 starts document 2: document 1's keys are not its memory
  own_doc[4:6, 2] = False   # t = 4, 5 (document 2) do not see t = 2 (document 1)
  np.testing.assert_array_equal(mask[1, :, 0], own_doc)
  np.testing.assert_array_equal(mask[1, :, 1], prev)
  wide = np.asarray(memory_layer.training_memory_mask(segments[:1], 2, 4, 0))[0, :, 0]
  np.testing.assert_array_equal(wide[4:6], [[True] * 4 + [False] * 2] * 2)  # two windows back


def _loss(model, params, tokens):
  logits = model.apply({"params": params}, tokens, train=True).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.PRNGKey(7), (B, T), 0, 64)


# fot: joint softmax, cross-batch training; longmem: top-k + gate (memorizing's merge) over
# another layer's keys. memorizing adds no path of its own (and ~5 s of compiles).
@pytest.fixture(scope="module", params=["fot", "longmem"])
def built(request, tokens):
  model = Transformer(_cfg(request.param))

  @jax.jit
  def init_and_forward(key):  # one compile for all
    params = model.init(key, tokens)["params"]
    params = jax.tree.map(lambda x: x + 0.05 * jnp.sign(x), params)  # gates away from 0
    return params, model.apply({"params": params}, tokens), model.apply(
        {"params": params}, tokens, train=True)
  return (request.param, model, *init_and_forward(jax.random.PRNGKey(1)))


def test_window_by_window_inference_equals_the_parallel_training_forward(built, tokens):
  kind, model, params, want, trained = built
  got, memory = memory_inference.run_windows(model, params, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  if kind == "fot":  # training adds cross-batch negatives: a different function
    assert float(jnp.abs(trained[:, WINDOW:] - want[:, WINDOW:]).max()) > 1e-4
  else:
    np.testing.assert_allclose(trained, want, atol=2e-5, rtol=2e-5)
  state = jax.tree.leaves(memory, is_leaf=lambda x: isinstance(x, knn_memory.KNNMemory))[0]
  assert int(state.written) == T
  # The memory matters: without it (window by window from an empty memory) the last windows
  # change.
  alone = jnp.concatenate([memory_inference.run_windows(model, params,
                                                        tokens[:, i:i + WINDOW])[0]
                           for i in range(0, T, WINDOW)], axis=1)
  np.testing.assert_allclose(alone[:, :WINDOW], want[:, :WINDOW], atol=2e-5, rtol=2e-5)
  assert float(jnp.abs(alone[:, WINDOW:] - want[:, WINDOW:]).max()) > 1e-4


def test_generate_continues_the_windowed_forward(built, tokens):
  kind, model, params, _, _ = built
  prompt = np.asarray(tokens[:, :WINDOW + 3])
  out = memory_inference.generate(model, params, prompt, 7)  # crosses a window boundary
  full = np.concatenate([prompt, out], axis=1)
  logits, _ = memory_inference.run_windows(model, params, jnp.asarray(full[:, :2 * WINDOW]))
  np.testing.assert_array_equal(np.argmax(logits[:, WINDOW + 2:2 * WINDOW - 1], -1),
                                out[:, :WINDOW - 3])
  rows = memory_inference.generate_fn(model, {"params": params}, prompt, 7)  # retrieval grids
  np.testing.assert_array_equal(rows, full)
  short = memory_inference.generate(model, params, prompt[:, :3], 2)  # inside the first window
  np.testing.assert_array_equal(short[:, 0], np.argmax(logits[:, 2], -1))
  with pytest.raises(ValueError, match="greedily"):
    memory_inference.generate_fn(model, {"params": params}, prompt, 7, temperature=0.5)


def test_longmem_backbone_gets_exactly_zero_gradient(built, tokens):
  kind, model, params, _, _ = built
  if kind != "longmem":
    pytest.skip("LongMem only")
  grads = jax.jit(jax.grad(lambda p: _loss(model, p, tokens)))(params)
  flat = {jax.tree_util.keystr(k): g for k, g in jax.tree_util.tree_leaves_with_path(grads)}
  side = {k: g for k, g in flat.items() if "side_layers" in k}
  frozen = {k: g for k, g in flat.items() if "side_layers" not in k}
  assert any("lm_head" in k for k in frozen) and any("embed_tokens" in k for k in frozen)
  for k, g in frozen.items():
    assert not np.any(np.asarray(g)), k
  for k, g in side.items():
    assert np.any(np.asarray(g)), k  # every side parameter (the gate included) trains


@pytest.mark.parametrize("kind,flows", [("memorizing", False), ("fot", True)])
def test_gradient_through_stored_keys_only_for_fot(kind, flows):
  cfg = _cfg(kind, memory_cross_batch=1 if kind == "fot" else 0)
  q = _rand(5, B, 16, K, H // K, D)
  k_BTKD, v_BTKD = _rand(6, B, 16, K, D), _rand(7, B, 16, K, D)
  segments = jnp.ones((B, 16), jnp.int32) * 2  # window_layout's ids for 2 windows
  opts = dict(scale=1.0, neighbours=cfg.memory_neighbors, approx=False, recall_target=1.0)

  def f(k, v):
    out, _, _ = memory_layer._training_memory(cfg, q, k, v, segments, cfg.memory_cross_batch,
                                              opts)
    return jnp.sum(out ** 2)
  gk, gv = jax.jit(jax.grad(f, argnums=(0, 1)))(k_BTKD, v_BTKD)
  assert bool(jnp.any(gk != 0)) == flows and bool(jnp.any(gv != 0)) == flows


def test_approx_top_k_at_recall_one_equals_exact():
  logits = _rand(8, 4, 64)
  exact = jax.lax.top_k(logits, 8)
  approx = knn_memory.top_neighbours(logits, 8, approx=True, recall_target=1.0)
  if not np.array_equal(np.sort(exact[1]), np.sort(approx[1])):
    pytest.skip(f"approx_max_k is approximate on {jax.default_backend()} even at recall 1.0")
  np.testing.assert_allclose(np.sort(exact[0]), np.sort(approx[0]))


@pytest.mark.parametrize("overrides,message", [
    (dict(memory_kind="fott"), "model.memory_kind='fott'; did you mean 'fot'"),
    (dict(memory_kind="none", memory_layers=[1]), "model.memory_layers"),
    (dict(memory_kind="fot", memory_layers=[1], scan_layers=True), "scan_layers=False"),
    (dict(memory_kind="fot", memory_layers=[2]), r"model.memory_layers entries .* \[-2, 2\)"),
    (dict(memory_kind="memorizing", memory_layers=[1], memory_cross_batch=1),
     "memory_cross_batch"),
    (dict(memory_kind="memorizing", memory_layers=[1], memory_size=4, memory_neighbors=8),
     "memory_neighbors=8 exceeds"),
    (dict(memory_kind="longmem", memory_layers=[0, 1], side_layers=1), "ONE backbone layer"),
    (dict(memory_kind="fot", memory_layers=[1], position_embedding_type="alibi"), "rotary"),
    (dict(memory_kind="fot", memory_layers=[1], memory_search="exakt"), "valid choices"),
])
def test_config_errors_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    model_config_from_dict({**BASE, **overrides})


def test_hf_export_refuses_memory_models(tmp_path):
  from ctxjax import hf
  with pytest.raises(ValueError, match=re.escape("model.memory_kind='fot'")):
    hf.save(Transformer(_cfg("fot")), {"params": {}}, tmp_path / "out")



@pytest.mark.parametrize("name", ["memorizing", "fot", "longmem"])
def test_passkey_variants_are_memory_models_of_the_passkey_model(name):
  from ml_collections.config_flags import config_flags as cf
  root = __file__.rsplit("/tests/", 1)[0]
  parse = lambda arg: cf.ConfigFileFlagParser(name="config").parse(
      f"{root}/configs/tiny_{name}.py:{arg}")
  cfg = model_config_from_dict(parse("passkey").model)
  assert cfg.memory_kind == name and cfg.num_hidden_layers == 2 and cfg.memory_layers == (1,)
  with pytest.raises(ValueError, match="valid choices"):
    parse("pasky")
