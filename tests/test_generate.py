"""Key/value-cache decoding: prefill + one-token steps give the logits of one forward pass over
the whole sequence (fp32, <= 1e-4) for every positional scheme, pattern and mode whose
reference does not itself differ (dynamic NTK / LongRoPE: tests/test_generate_hf.py); bounded
caches keep constant memory; `generate` is greedy argmax of those logits, handles padding, eos
and sampling, and refuses bad input with one message."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.eval import generate
from ctxjax.model import kv_cache
from ctxjax.model.config import model_config_from_dict
from ctxjax.model.transformer import Transformer

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=128, scan_layers=False, initializer_range=0.3)
TOL = 1e-4
CASES = {
    "rope": {},
    "rope_scan": dict(scan_layers=True),
    "yarn": dict(rope_scaling=dict(rope_type="yarn", factor=4.0,
                                   original_max_position_embeddings=8)),
    "linear": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "llama3": dict(rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8)),
    "ntk": dict(rope_scaling=dict(rope_type="ntk", factor=4.0)),
    "abf": dict(rope_theta=5e5),
    "alibi": dict(position_embedding_type="alibi"),
    "xpos": dict(position_embedding_type="xpos"),
    "sinusoidal": dict(position_embedding_type="sinusoidal"),
    "learned": dict(position_embedding_type="learned"),
    "nope": dict(position_embedding_type="none"),
    "sinks": dict(attention_pattern=dict(kind="attention_sinks", sink_size=2, window=4)),
    "sliding_window": dict(attention_pattern=dict(kind="sliding_window", window=5)),
    "lambda_alibi": dict(attention_pattern=dict(kind="lambda", n_global=3, n_local=4),
                         position_embedding_type="alibi"),
    "block_causal_xpos": dict(attention_pattern=dict(kind="block_causal", block_size=3),
                              position_embedding_type="xpos"),
    "lm_infinite": dict(attention_mode="lm_infinite", attention_impl="blockwise",
                        attention_options=dict(n_global=2, n_local=4)),
    "lm_infinite_scan": dict(attention_mode="lm_infinite", attention_impl="reference",
                             scan_layers=True, attention_options=dict(n_global=1, n_local=3)),
    "s2_inference": dict(attention_mode="s2", attention_options=dict(group_size=4)),
}


def _model(**overrides):
  cfg = model_config_from_dict({**BASE, **overrides})
  model = Transformer(cfg)
  return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


def decode_logits(model, variables, tokens, prompt_len, capacity=None):
  """Logits [B, T, V] of a prefill over tokens[:, :prompt_len], then one step per token."""
  batch, total = tokens.shape
  cap, n_first = kv_cache.cache_capacity(model.cfg, total)
  cache = kv_cache.init_cache(model.cfg, batch, capacity or cap, n_first=n_first)
  apply = jax.jit(model.apply)
  pos = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (batch, prompt_len))
  logits, cache = apply(variables, tokens[:, :prompt_len], pos,
                        np.ones_like(pos), cache=cache)
  out = [logits]
  for t in range(prompt_len, total):
    logits, cache = apply(variables, tokens[:, t:t + 1], np.full((batch, 1), t, np.int32),
                          np.ones((batch, 1), np.int32), cache=cache)
    out.append(logits)
  return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_and_steps_equal_full_forward(name):
  model, variables = _model(**CASES[name])
  tokens = np.random.default_rng(1).integers(0, 64, (2, 19)).astype(np.int32)
  full = model.apply(variables, tokens).astype(jnp.float32)
  steps, _ = decode_logits(model, variables, tokens, prompt_len=9)
  assert float(jnp.abs(full).max()) > 0.5  # not trivially small logits
  np.testing.assert_allclose(np.asarray(steps), np.asarray(full), atol=TOL, rtol=0)


def test_bf16_cache_error_within_the_forward_passes_own():
  """In bf16 the cache is bf16 (the model's dtype); decoding errs vs fp32 no more than the
  bf16 forward pass itself does (x2, + 1e-2)."""
  model, variables = _model(dtype="bfloat16")
  tokens = np.random.default_rng(1).integers(0, 64, (2, 19)).astype(np.int32)
  exact = Transformer(dataclasses.replace(model.cfg, dtype="float32")).apply(variables, tokens)
  steps, cache = decode_logits(model, variables, tokens, prompt_len=9)
  assert cache.k[0].dtype == jnp.bfloat16
  forward_err = float(jnp.abs(model.apply(variables, tokens).astype(jnp.float32) - exact).max())
  decode_err = float(jnp.abs(steps.astype(jnp.float32) - exact).max())
  assert decode_err <= 2 * forward_err + 1e-2, (decode_err, forward_err)


def test_a_wrong_position_is_caught():
  """The comparison above is sensitive: decoding one token at a shifted position differs."""
  model, variables = _model()
  tokens = np.random.default_rng(1).integers(0, 64, (1, 12)).astype(np.int32)
  full = model.apply(variables, tokens)
  cache = kv_cache.init_cache(model.cfg, 1, 12)
  _, cache = model.apply(variables, tokens[:, :11], np.arange(11)[None], np.ones((1, 11)),
                         cache=cache)
  wrong, _ = model.apply(variables, tokens[:, 11:], np.full((1, 1), 13), np.ones((1, 1)),
                         cache=cache)
  assert float(jnp.abs(wrong[:, 0] - full[:, 11]).max()) > 1e-2


@pytest.mark.parametrize("name", ["sinks", "lm_infinite"])
def test_bounded_cache_memory_constant_over_a_long_stream(name):
  """A stream 10x the cache: the cache never grows, and its logits still equal the forward."""
  model, variables = _model(**CASES[name])
  cap, _ = kv_cache.cache_capacity(model.cfg, 10 ** 6)
  assert cap == 6
  tokens = np.random.default_rng(2).integers(0, 64, (1, 10 * cap)).astype(np.int32)
  steps, cache = decode_logits(model, variables, tokens, prompt_len=2)
  assert cache.capacity == cap and cache.k[0].shape[2] == cap  # [B, K, C, D]
  assert cache.nbytes() == kv_cache.init_cache(model.cfg, 1, cap, n_first=cache.n_first).nbytes()
  # both keep the first 2 positions and the last 4 of the 60
  np.testing.assert_array_equal(np.sort(np.asarray(cache.positions[0])), [0, 1, 56, 57, 58, 59])
  full = model.apply(variables, tokens)
  np.testing.assert_allclose(np.asarray(steps), np.asarray(full), atol=TOL, rtol=0)


def test_prefill_longer_than_a_bounded_cache():
  model, variables = _model(**CASES["sinks"])
  tokens = np.random.default_rng(3).integers(0, 64, (2, 30)).astype(np.int32)
  steps, cache = decode_logits(model, variables, tokens, prompt_len=20)
  np.testing.assert_allclose(np.asarray(steps), np.asarray(model.apply(variables, tokens)),
                             atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["rope", "alibi", "lm_infinite"])
def test_generate_greedy_equals_argmax_of_full_forward(name):
  """Each new token is the argmax of one forward pass over the sequence before it (checked on
  the whole output at once: position t's logits see exactly tokens 0..t)."""
  model, variables = _model(**CASES[name])
  prompt = np.random.default_rng(4).integers(0, 64, (2, 7)).astype(np.int32)
  out = generate(model, variables, prompt, 9)
  assert out.dtype == jnp.int32 and out.shape == (2, 16)
  np.testing.assert_array_equal(out[:, :7], prompt)
  best = np.asarray(jnp.argmax(model.apply(variables, out)[:, 6:-1], axis=-1))
  np.testing.assert_array_equal(out[:, 7:], best)


def test_generate_right_padded_batch_equals_each_row_alone():
  model, variables = _model()
  rng = np.random.default_rng(5)
  rows = [rng.integers(0, 64, n).astype(np.int32) for n in (3, 8, 5)]
  prompt = np.zeros((3, 8), np.int32)
  for i, r in enumerate(rows):
    prompt[i, :len(r)] = r
  out = np.asarray(generate(model, variables, prompt, 6, prompt_lengths=[3, 8, 5]))
  np.testing.assert_array_equal(out[:, :8], prompt)
  for i, r in enumerate(rows):
    alone = np.asarray(generate(model, variables, r[None], 6))
    np.testing.assert_array_equal(out[i, 8:], alone[0, len(r):])


def test_generate_eos_fills_the_rest():
  model, variables = _model()
  prompt = np.random.default_rng(6).integers(0, 64, (2, 5)).astype(np.int32)
  free = np.asarray(generate(model, variables, prompt, 8))
  eos = int(free[0, 7])  # the third generated token of row 0 becomes the eos id
  out = np.asarray(generate(model, variables, prompt, 8, eos_id=eos))
  first = int(np.argmax(free[0, 5:] == eos))
  np.testing.assert_array_equal(out[0, 5:5 + first + 1], free[0, 5:5 + first + 1])
  assert (out[0, 5 + first:] == eos).all()


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
  model, variables = _model()
  prompt = np.random.default_rng(7).integers(0, 64, (2, 5)).astype(np.int32)
  a = generate(model, variables, prompt, 10, temperature=1.0, seed=3)
  b = generate(model, variables, prompt, 10, temperature=1.0, seed=3)
  c = generate(model, variables, prompt, 10, temperature=1.0, seed=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  nucleus_of_one = generate(model, variables, prompt, 10, temperature=1.0, top_p=1e-6, seed=9)
  np.testing.assert_array_equal(nucleus_of_one, generate(model, variables, prompt, 10))


@pytest.mark.parametrize("overrides, kwargs, match", [
    (dict(position_embedding_type="learned", max_position_embeddings=16), dict(n=10),
     "max_position_embeddings=16"),
    ({}, dict(n=0), "max_new_tokens"),
    ({}, dict(n=3, prompt_lengths=[9, 1]), "prompt_lengths"),
    ({}, dict(n=3, temperature=-1.0), "temperature"),
    (dict(attention_mode="dilated", attention_impl="reference",
          attention_options=dict(segment_lengths=[4], dilation_rates=[1])), dict(n=3),
     "attention_mode='dilated'"),
])
def test_generate_bad_input_one_message(overrides, kwargs, match):
  model, variables = _model(**overrides)
  prompt = np.ones((2, 8), np.int32)
  n = kwargs.pop("n")
  with pytest.raises(ValueError, match=match):
    generate(model, variables, prompt, n, **kwargs)


def test_a_scanned_model_generates_as_its_unrolled_twin():
  """generate decodes a scan_layers model with its parameters unstacked (params.unrolled):
  the unrolled model on those parameters gives the scanned model's logits and tokens."""
  from ctxjax.model import params as params_lib
  scanned, variables = _model(scan_layers=True)
  twin = Transformer(dataclasses.replace(scanned.cfg, scan_layers=False))
  unrolled = {"params": params_lib.unrolled(variables["params"], scanned.cfg)}
  tokens = np.random.default_rng(3).integers(0, 64, (2, 9)).astype(np.int32)
  np.testing.assert_allclose(twin.apply(unrolled, tokens), scanned.apply(variables, tokens),
                             atol=TOL, rtol=0)  # the same sums, fused differently
  np.testing.assert_array_equal(generate(scanned, variables, tokens, 6),
                                generate(twin, unrolled, tokens, 6))
