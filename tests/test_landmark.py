"""Landmark attention (Mohtashami & Jaggi 2023): ctxjax/attention/landmark.py,
ctxjax/model/landmark_mode.py, ctxjax/data/landmark.py, ctxjax/model/landmark_generate.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention.landmark import landmark_blockwise, landmark_reference, with_landmarks
from ctxjax.data.landmark import content_length, insert_landmarks

F = 3           # mem_freq: blocks of 4 slots, the last one the landmark
B, T, H, K, D = 2, 14, 4, 2, 8   # 14 slots: 3 full blocks + a partial one; grouped-query heads


def _direct(q, k, v, seg, mem_freq, top_k=None):
  """The paper's formula, one (row, head, query) at a time: one softmax over the current
  block's tokens (its landmark excluded) and the past blocks' landmarks; each past block's
  tokens get their in-block softmax times their landmark's probability. top_k: only the
  top_k past landmarks by score enter (the retrieval at inference)."""
  p_len = mem_freq + 1
  out = np.zeros(q.shape)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      kh = h // (q.shape[2] // k.shape[2])
      for i in range(q.shape[1]):
        s = {j: q[b, i, h] @ k[b, j, kh] / np.sqrt(q.shape[-1])
             for j in range(i + 1) if seg[b, j] == seg[b, i]}
        cur = [j for j in s if j // p_len == i // p_len and j % p_len != mem_freq]
        marks = [j for j in s if j // p_len < i // p_len and j % p_len == mem_freq]
        if top_k is not None:
          marks = sorted(marks, key=lambda j: -s[j])[:top_k]
        z = sum(np.exp(s[j]) for j in cur + marks)
        for j in cur:
          out[b, i, h] += np.exp(s[j]) / z * v[b, j, kh]
        for m in marks:
          blk = [j for j in s if j // p_len == m // p_len and j != m]
          zb = sum(np.exp(s[j]) for j in blk)
          for j in blk:
            out[b, i, h] += np.exp(s[m]) / z * np.exp(s[j]) / zb * v[b, j, kh]
  return out


@pytest.fixture(scope="module")
def qkv():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(B, T, n, D)).astype(np.float32) for n in (H, K, K))
  seg = np.ones((B, T), np.int32)
  seg[1, 6:] = 2  # a second document from the middle of block 1 on
  return q, k, v, seg


@pytest.mark.parametrize("top_k", [None, 1])
def test_grouped_softmax_equals_its_definition(qkv, top_k):
  q, k, v, seg = qkv
  want = _direct(q, k, v, seg, F, top_k)
  got = landmark_reference(q, k, v, segment_ids=seg, mem_freq=F, top_k=top_k)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_blockwise_equals_reference_values_and_gradients(qkv):
  q, k, v, seg = qkv
  cot = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  loss = lambda fn: jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(fn(q, k, v, segment_ids=seg, mem_freq=F) * cot), argnums=(0, 1, 2)))
  (lr, gr), (lb, gb) = loss(landmark_reference)(q, k, v), loss(landmark_blockwise)(q, k, v)
  np.testing.assert_allclose(lb, lr, rtol=1e-5)
  for a, b in zip(gb, gr):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(landmark_blockwise(q, k, v, segment_ids=seg, mem_freq=F, top_k=1),
                             _direct(q, k, v, seg, F, 1), atol=1e-5)


def test_blockwise_gradient_memory_is_linear_in_length():
  """XLA's own buffer plan for the backward pass: doubling T doubles it (a [T, T] score matrix
  would quadruple it). Measured at 4 heads of 32: 3.0 / 6.4 / 12.6 MiB at T = 512 / 1K / 2K."""
  def temp_bytes(t):
    x = jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(landmark_blockwise(
        q, k, v, segment_ids=s, mem_freq=7)), argnums=(0, 1, 2)))
    compiled = grad.lower(x, x, x, jax.ShapeDtypeStruct((1, t), jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  assert temp_bytes(512) < 2.5 * temp_bytes(256)


def test_top_k_with_every_block_is_the_full_grouped_attention(qkv):
  q, k, v, seg = qkv
  full = landmark_reference(q, k, v, segment_ids=seg, mem_freq=F)
  # 3 = every past block of the last block, fewer than the 4 blocks: the top-k path runs
  every = landmark_blockwise(q, k, v, segment_ids=seg, mem_freq=F, top_k=3)
  np.testing.assert_allclose(every, full, atol=1e-6)
  assert np.abs(_direct(q, k, v, seg, F, 1) - full).max() > 1e-3  # top-1 does drop blocks


def test_insert_landmarks_places_them_and_ignores_their_labels():
  seq_len = 10                        # blocks [0..3], [4..7], [8, 9]: landmarks at slots 3, 7
  n = content_length(seq_len, F)
  assert n == 8
  inputs = np.arange(100, 108, dtype=np.int32)[None]
  batch = dict(inputs=inputs, targets=inputs + 1, loss_mask=np.ones((1, n), np.float32),
               segment_ids=np.array([[1, 1, 1, 1, 2, 2, 2, 2]], np.int32),
               positions=np.array([[40, 41, 42, 43, 0, 1, 2, 3]], np.int32))
  out = insert_landmarks(batch, seq_len=seq_len, mem_freq=F, landmark_id=99)
  np.testing.assert_array_equal(out["inputs"][0], [100, 101, 102, 99, 103, 104, 105, 99, 106, 107])
  # the token before a landmark still predicts the next content token; the landmark: masked
  np.testing.assert_array_equal(out["targets"][0], [101, 102, 103, 99, 104, 105, 106, 99, 107, 108])
  np.testing.assert_array_equal(out["loss_mask"][0], [1, 1, 1, 0, 1, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
  # positions count landmarks: segment 1 continues a document (40 + 40 // 3 landmarks before)
  np.testing.assert_array_equal(out["positions"][0], [53, 54, 55, 56, 57, 0, 1, 2, 3, 4])
  np.testing.assert_array_equal(with_landmarks(np.arange(7)[None], F, 9)[0],
                                [0, 1, 2, 9, 3, 4, 5, 9, 6])


def _model_dict(**options):
  return dict(vocab_size=65, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=128, scan_layers=True, attention_mode="landmark",
              attention_impl="auto",
              attention_options=dict(dict(mem_freq=F, top_k=8, landmark_token_id=64), **options))


def _params(model, tokens):
  """Parameters of the model's shapes without compiling its init: N(0, 0.02) kernels and
  embeddings, unit norm scales."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(path)
      else jnp.asarray(0.02 * rng.normal(size=s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def tiny_model():
  from ctxjax.model import Transformer, model_config_from_dict
  model = Transformer(model_config_from_dict(_model_dict()))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 24)), jnp.int32)
  return model, {"params": _params(model, tokens)}, tokens


def test_model_retrieves_top_k_blocks_only_at_inference(tiny_model):
  from ctxjax.model import Transformer, model_config_from_dict
  from ctxjax.model.landmark_generate import _logits  # jitted apply, shared with generation
  model, variables, tokens = tiny_model
  train = jax.jit(lambda v, t: model.apply(v, t, train=True))(variables, tokens)
  np.testing.assert_allclose(_logits(model, variables, tokens), train, atol=1e-6)  # 8 >= 5 blocks
  top1 = Transformer(model_config_from_dict(_model_dict(top_k=1)))
  assert np.abs(_logits(top1, variables, tokens) - train).max() > 1e-3


def test_landmark_generate_reads_a_prompt_past_the_training_length(tiny_model):
  from ctxjax.model.landmark_generate import content_logits, landmark_generate
  model, variables, tokens = tiny_model
  prompt = np.asarray(tokens)[:, :15]  # 15 + 3 tokens: 24 slots, past 4 training blocks
  out = landmark_generate(model, variables, prompt, 3)
  np.testing.assert_array_equal(out[:, :15], prompt)
  logits = content_logits(model, variables, out)  # teacher forcing agrees with greedy
  np.testing.assert_array_equal(np.argmax(np.asarray(logits)[:, 14:17, :64], -1), out[:, 15:])
  with pytest.raises(ValueError, match="landmark id 64"):
    landmark_generate(model, variables, np.full((1, 4), 64), 1)


def test_cached_generation_and_hf_export_refuse_landmark_models(tiny_model):
  from ctxjax.eval.generation import generate
  from ctxjax.hf_config import hf_config_from
  model, variables, tokens = tiny_model
  with pytest.raises(ValueError, match="attention_mode='landmark'"):
    generate(model, variables, tokens[:, :4], 1)
  with pytest.raises(ValueError, match="attention_mode='landmark' cannot be exported"):
    hf_config_from(model.cfg)


def test_landmark_options_are_checked():
  from ctxjax.model import model_config_from_dict
  bad = _model_dict()
  del bad["attention_options"]["top_k"]
  with pytest.raises(ValueError, match=r"missing \['top_k'\]"):
    model_config_from_dict(bad)
  with pytest.raises(ValueError, match="does not support ALiBi"):
    model_config_from_dict(dict(_model_dict(), position_embedding_type="alibi"))


def test_tiny_landmark_config_trains():
  """configs/tiny_landmark.py shrunk: the trainer's step (ctxjax/train/step.py) learns on rows
  with landmarks."""
  import optax
  from configs import tiny_landmark
  from ctxjax.data.config import data_config
  from ctxjax.model import Transformer, model_config_from_dict
  from ctxjax.train.step import TrainState, make_train_step
  config = tiny_landmark.get_config()
  config.model.update(num_hidden_layers=1, hidden_size=32, intermediate_size=64, head_dim=8)
  config.model.attention_options = dict(config.model.attention_options, mem_freq=7)
  config.data.update(seq_len=32, batch_size=2)
  model_cfg = model_config_from_dict(config.model.to_dict())
  data_cfg = data_config(config.data.to_dict())
  ids = np.random.default_rng(0).integers(0, 1024, (2, 29)).astype(np.int32)
  batch = insert_landmarks(dict(inputs=ids[:, :-1], targets=ids[:, 1:],
                                positions=np.broadcast_to(np.arange(28, dtype=np.int32), (2, 28)),
                                segment_ids=np.ones((2, 28), np.int32),
                                loss_mask=np.ones((2, 28), np.float32)),
                           seq_len=32, mem_freq=7, landmark_id=1024)
  params = _params(Transformer(model_cfg), batch["inputs"])
  tx = optax.adam(1e-2)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0))
  step = make_train_step(Transformer(model_cfg), tx, data_cfg)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(np.log(1025), abs=0.1)  # uniform over 1025 ids at init
  assert losses[2] < losses[0] - 0.1, losses


class _Rows:
  """A stand-in data source: content rows of its seq_len, ids below its vocab_size."""
  def __init__(self, data_cfg, model_cfg, seed):
    self.shape, self.vocab = (data_cfg.batch_size, data_cfg.seq_len), model_cfg.vocab_size

  def train_batches(self):
    ones = np.ones(self.shape, np.int32)
    while True:
      yield dict(inputs=ones * (self.vocab - 1), targets=ones, positions=np.cumsum(ones, 1) - 1,
                 segment_ids=ones, loss_mask=ones.astype(np.float32))

  def unigram_entropy(self):
    return 1.5


def test_landmark_source_wraps_a_source_with_the_content_vocabulary():
  from configs import tiny_landmark
  from ctxjax.data.config import data_config
  from ctxjax.data.landmark import LandmarkSource
  from ctxjax.model import model_config_from_dict
  config = tiny_landmark.get_config()
  config.data.update(seq_len=64, batch_size=2)
  source = LandmarkSource(_Rows, data_config(config.data.to_dict()),
                          model_config_from_dict(config.model.to_dict()), seed=0)
  batch = next(source.train_batches())
  mem = np.arange(64) % 32 == 31
  assert batch["inputs"].shape == (2, 64) and (batch["inputs"][:, mem] == 1024).all()
  assert (batch["inputs"][:, ~mem] == 1023).all()  # the inner source saw vocab_size 1024
  np.testing.assert_array_equal(batch["positions"][0], np.arange(64))
  assert source.unigram_entropy() == 1.5


def test_landmark_source_needs_the_last_id_for_the_landmark():
  from configs import tiny_landmark
  from ctxjax.data import registry
  from ctxjax.data.config import data_config
  from ctxjax.model import model_config_from_dict
  bad = tiny_landmark.get_config().to_dict()
  bad["model"]["attention_options"]["landmark_token_id"] = 5
  with pytest.raises(ValueError, match="landmark_token_id must be the last id, vocab_size - 1"):
    registry.build(data_config(bad["data"]), model_config_from_dict(bad["model"]), seed=0)
