"""The cached landmark decoder (Mohtashami & Jaggi 2023, Section 3.2): prefill, decode_step and
landmark_generate of ctxjax/model/landmark_generate.py, landmark_mode.decode_step and
landmark_decode of ctxjax/attention/landmark.py, against the uncached reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention.landmark import landmark_decode, with_landmarks
from ctxjax.model import Transformer, model_config_from_dict
from ctxjax.model import landmark_generate as lg

F = 3            # mem_freq: blocks of 4 slots, the landmark last
MARK = 64        # the landmark id (the last of 65)


def _model(top_k: int, *, impl: str = "auto", scan_layers: bool = True):
  return Transformer(model_config_from_dict(dict(
      vocab_size=MARK + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
      scan_layers=scan_layers, attention_mode="landmark", attention_impl=impl,
      attention_options=dict(mem_freq=F, top_k=top_k, landmark_token_id=MARK))))


def _variables(model, seed: int):
  """Random parameters, N(0, 0.1^2) (sharp enough that retrieval matters), unit norm scales;
  no init compile."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(path)
      else jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype), shapes)


def _prompt(seed: int, batch: int, length: int):
  return np.random.default_rng(100 + seed).integers(0, MARK, (batch, length)).astype(np.int32)


# (seed, prompt length, max_new_tokens, top_k), 19 content tokens in all (25 slots: one
# uncached program per top_k). A prompt of 12 ends at a block boundary (with its landmark),
# 13/14 mid-block, 2 before the first landmark; every answer crosses landmark insertions (2 to
# 6). top_k=1: fewer than the 3+ past blocks; top_k=8: every block (7 at most).
CASES = [(0, 12, 7, 1), (1, 13, 6, 1), (2, 14, 5, 8), (3, 12, 7, 8), (4, 2, 17, 1)]


@pytest.mark.parametrize("seed,length,max_new,top_k", CASES)
def test_cached_tokens_equal_the_uncached_reference(seed, length, max_new, top_k):
  model = _model(top_k)
  variables = _variables(model, seed)
  prompt = _prompt(seed, 2, length)
  got = lg.landmark_generate(model, variables, prompt, max_new)
  want = lg.landmark_generate_uncached(model, variables, prompt, max_new)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[:, :length], prompt)
  assert got.shape == (2, length + max_new) and (got[:, length:] != MARK).all()


@pytest.mark.parametrize("impl,scan_layers", [("auto", True), ("reference", False)])
def test_each_decode_step_has_the_logits_of_a_full_forward(impl, scan_layers):
  """Prefill 10 slots (ends mid-block), then decode every slot of 28 (7 blocks) one at a time,
  landmarks included: each step's logits are the full train=False forward's at that slot."""
  slots = jnp.asarray(with_landmarks(_prompt(0, 2, 21), F, MARK))     # [2, 28]
  for top_k in (1, 8):
    model = _model(top_k, impl=impl, scan_layers=scan_layers)
    variables = _variables(model, 0)
    full = np.asarray(lg._logits(model, variables, slots))          # noqa: SLF001
    logits, cache = lg.prefill(model, variables, slots[:, :10], 28)
    np.testing.assert_allclose(logits, full[:, :10], atol=1e-5, rtol=1e-5)
    for j in range(10, 28):
      step, cache = lg.decode_step(model, variables, slots[:, j], cache)
      np.testing.assert_allclose(step, full[:, j], atol=1e-5, rtol=1e-5, err_msg=f"slot {j}")
    if top_k == 1:
      top1 = full
  # the retrieval is exercised: top-1 drops blocks that every-block attention reads
  assert np.abs(top1[:, 12:] - full[:, 12:]).max() > 1e-2


def test_the_cache_holds_every_slot_landmarks_included():
  model = _model(1)
  variables = _variables(model, 1)
  slots = jnp.asarray(with_landmarks(_prompt(1, 2, 15), F, MARK))     # [2, 20], 5 landmarks
  _, cache = lg.prefill(model, variables, slots[:, :6], 20)
  for j in range(6, 20):
    _, cache = lg.decode_step(model, variables, slots[:, j], cache)
  _, whole = lg.prefill(model, variables, slots, 20)
  np.testing.assert_array_equal(cache.length, [20, 20])
  np.testing.assert_array_equal(cache.valid, np.ones((2, 20)))
  np.testing.assert_array_equal(cache.positions, np.tile(np.arange(20), (2, 1)))
  # every layer's k/v [L, B, K, C, D] of every slot, decoded one by one = prefilled at once
  assert cache.k.shape == (2, 2, 2, 20, 8)
  np.testing.assert_allclose(cache.k, whole.k, atol=1e-5)
  np.testing.assert_allclose(cache.v, whole.v, atol=1e-5)
  # the landmarks' keys are in it and are read: zero them and the next query's output moves
  marks = np.arange(20) % (F + 1) == F
  assert np.abs(np.asarray(cache.k)[:, :, :, marks]).min(axis=-1).max() > 0
  q = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 4, 8)), jnp.float32)
  k, v = (jnp.swapaxes(x[0], 1, 2) for x in (cache.k, cache.v))    # layer 0, [B, C, K, D]
  run = lambda k: landmark_decode(q, k, v, slot=jnp.array([18, 18]),
                                  segment_ids=jnp.ones((2, 1), jnp.int32),
                                  k_segment_ids=cache.valid, mem_freq=F, top_k=1)
  assert np.abs(run(k) - run(k.at[:, marks].set(0.0))).max() > 1e-3


def test_landmark_decode_needs_whole_blocks_and_generate_points_to_the_decoder():
  x = jnp.zeros((1, 6, 1, 8))
  with pytest.raises(ValueError, match="whole blocks of mem_freq \\+ 1 = 4 slots, got 6"):
    landmark_decode(x[:, :1], x, x, slot=jnp.array([5]), segment_ids=jnp.ones((1, 1)),
                    k_segment_ids=jnp.ones((1, 6)), mem_freq=F)
  from ctxjax.eval.generation import generate
  model = _model(1)
  with pytest.raises(ValueError, match="decodes with ctxjax.model.landmark_generate"):
    generate(model, _variables(model, 0), _prompt(0, 1, 4), 1)
