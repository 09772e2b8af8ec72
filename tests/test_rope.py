"""Spec for ctxjax.positions.rope: reference vectors of each method (RoPE, Su et al. 2021;
PI, Chen et al. 2023; NTK, bloc97 2023; YaRN, Peng et al. 2023; Llama 3.1) and HF 5.23 parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.positions.rope import (
  ROPE_TYPES,
  apply_rope,
  rope_inv_freq,
  rope_seq_len,
  validate_rope_scaling,
)

# Config A: head_dim 64, theta 1e4, max_pos 1024, original 256, factor 4.
A = dict(head_dim=64, rope_theta=1e4, max_position_embeddings=1024)
IDX = [0, 10, 31]
RTOL_VEC = 2e-6  # the reference vectors carry 7 significant digits
DYN4 = {"rope_type": "dynamic", "factor": 4.0}
YARN_A = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
LLAMA3_A = {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 256}
LONGROPE_A = {
  "rope_type": "longrope",
  "short_factor": [1.0] * 32,
  "long_factor": [float(x) for x in np.linspace(1, 4, 32)],
  "original_max_position_embeddings": 256,
}


def inv_af(rope_scaling, seq_len=None, **dims):
  """rope_inv_freq on Config A (overridable) -> (float64 numpy [d/2], float af)."""
  dims = {**A, **dims}
  inv, af = rope_inv_freq(rope_scaling, seq_len=seq_len, **dims)
  assert inv.dtype == jnp.float32 and inv.shape == (dims["head_dim"] // 2,)
  assert af.dtype == jnp.float32 and af.shape == ()
  return np.asarray(inv, np.float64), float(af)


def base_table(head_dim, base):
  return base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


# --- reference vectors (float64, from each paper's formula)


def test_registry_has_all_types():
  assert set(ROPE_TYPES) >= {"default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope"}


@pytest.mark.parametrize("rs", [None, {"rope_type": "default"}, {"type": "default"}, {}])
def test_default_vectors(rs):
  inv, af = inv_af(rs)
  np.testing.assert_allclose(inv[IDX], [1.0, 5.623413e-2, 1.333521e-4], rtol=RTOL_VEC)
  assert af == 1.0


@pytest.mark.parametrize("theta,wavelength", [(1e4, 54410), (5e5, 2.559e6), (1e6, 5.063e6)])
def test_default_slowest_wavelength_d128(theta, wavelength):  # ABF: only the base changes
  inv, _ = inv_af(None, head_dim=128, rope_theta=theta)
  assert 2 * math.pi / inv[-1] == pytest.approx(wavelength, rel=1e-3)


def test_linear_vectors():
  inv, af = inv_af({"rope_type": "linear", "factor": 4.0})
  np.testing.assert_allclose(inv[IDX], [0.25, 1.405853e-2, 3.333804e-5], rtol=RTOL_VEC)
  assert af == 1.0


@pytest.mark.parametrize(
  "head_dim,factor,base",
  [(128, 2.0, 20221.26), (128, 4.0, 40889.94), (128, 8.0, 82684.62), (64, 4.0, 41829.37)])
def test_ntk_bases(head_dim, factor, base):
  inv, af = inv_af({"rope_type": "ntk", "factor": factor}, head_dim=head_dim)
  np.testing.assert_allclose(inv, base_table(head_dim, base), rtol=RTOL_VEC)
  assert af == 1.0


@pytest.mark.parametrize(
  "seq_len,base",
  [(None, 1e4), (1, 1e4), (100, 1e4), (256, 1e4), (512, 52664.43), (1024, 141213.76),
   (2048, 323275.00)])
def test_dynamic_bases(seq_len, base):
  # Dynamic NTK (emozilla 2023): max_pos 256 (Lmax is max_position_embeddings, not an
  # original), f 4, d 64.
  inv, af = inv_af(DYN4, seq_len=seq_len, max_position_embeddings=256)
  np.testing.assert_allclose(inv, base_table(64, base), rtol=RTOL_VEC)
  assert af == 1.0


def test_dynamic_vectors_at_1024():
  inv, _ = inv_af(DYN4, seq_len=1024, max_position_embeddings=256)
  np.testing.assert_allclose(inv[[10, 31]], [2.458462e-2, 1.025786e-5], rtol=RTOL_VEC)


@pytest.mark.parametrize("seq_len,base", [(8192, 30527.74), (16384, 72195.86)])
def test_dynamic_bases_d128(seq_len, base):
  inv, _ = inv_af({"rope_type": "dynamic", "factor": 2.0}, seq_len=seq_len, head_dim=128,
                  max_position_embeddings=4096)
  np.testing.assert_allclose(inv, base_table(128, base), rtol=RTOL_VEC)


def test_yarn_config_a():
  inv, af = inv_af(YARN_A)
  np.testing.assert_allclose(inv[IDX], [1.0, 2.379136e-2, 3.333804e-5], rtol=RTOL_VEC)
  assert af == pytest.approx(1.138629, abs=1e-6)
  assert af**2 == pytest.approx(1.296477, abs=1e-6)  # logits scale by af^2
  # Correction range (0, 13): inv'/inv falls linearly from 1 at i = 0 to 1/f at i >= 13.
  i = np.arange(32)
  expected_ratio = np.where(i >= 13, 0.25, 1 - 0.75 * i / 13)
  np.testing.assert_allclose(inv / base_table(64, 1e4), expected_ratio, rtol=1e-6)


def test_yarn_no_truncate():
  inv, _ = inv_af({**YARN_A, "truncate": False})
  assert inv[10] == pytest.approx(2.414773e-2, rel=RTOL_VEC)


@pytest.mark.parametrize(
  "factor,af",
  [(2, 1.069315), (4, 1.138629), (8, 1.207944), (16, 1.277259), (32, 1.346574), (40, 1.368888)])
def test_yarn_mscale_table(factor, af):
  _, got = inv_af({**YARN_A, "factor": float(factor)})
  assert got == pytest.approx(af, abs=1e-6)


@pytest.mark.parametrize("extra,af", [
  ({}, 1.368888),
  ({"mscale": 1.0, "mscale_all_dim": 1.0}, 1.0),
  ({"mscale": 0.707, "mscale_all_dim": 0.707}, 1.0),
  ({"mscale": 1.0, "mscale_all_dim": 0.0}, 1.368888),  # 0 is falsy: plain mscale(f)
  ({"mscale": 1.0, "mscale_all_dim": 0.5}, 1.155722),
  ({"mscale": 1.0, "mscale_all_dim": 0.5, "attention_factor": 0.9}, 0.9),  # explicit wins
])
def test_yarn_attention_factor_rules(extra, af):
  _, got = inv_af({**YARN_A, "factor": 40.0, **extra})
  assert got == pytest.approx(af, abs=1e-6)


def test_yarn_explicit_factor_wins_over_ratio():
  # max_pos / original = 8 but factor = 4: HF 5.23 uses 4.
  inv, af = inv_af(YARN_A, max_position_embeddings=2048)
  assert af == pytest.approx(1.138629, abs=1e-6)
  assert inv[31] == pytest.approx(3.333804e-5, rel=RTOL_VEC)


def test_yarn_d128():
  rs = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
  inv, _ = inv_af(rs, head_dim=128, max_position_embeddings=16384)
  np.testing.assert_allclose(inv[[16, 17, 28, 63]], [0.1, 0.0865964, 0.0136791, 2.88695e-5],
                             rtol=5e-6)  # 6 significant digits
  ratio = inv / base_table(128, 1e4)  # ramp (20, 46): untouched up to 20, divided by f from 46
  np.testing.assert_allclose(ratio[:21], 1.0, rtol=1e-6)
  np.testing.assert_allclose(ratio[46:], 0.25, rtol=1e-6)


@pytest.mark.parametrize("theta,orig,low,high",
                         [(1e4, 4096, 20, 46), (1e4, 2048, 16, 41), (5e5, 8192, 18, 35)])
def test_yarn_correction_range_d128(theta, orig, low, high):
  rs = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": orig}
  inv, _ = inv_af(rs, head_dim=128, rope_theta=theta)
  ratio = inv / base_table(128, theta)
  interior = np.nonzero((ratio < 1 - 1e-6) & (ratio > 0.25 + 1e-6))[0]
  assert interior[0] == low + 1 and interior[-1] == high - 1


def test_yarn_zero_betas_mean_defaults():
  a, _ = inv_af(YARN_A)
  b, _ = inv_af({**YARN_A, "beta_fast": 0, "beta_slow": 0})
  np.testing.assert_array_equal(a, b)


def test_llama3_config_a():
  inv, af = inv_af(LLAMA3_A)  # low/high_freq_factor default to 1/4
  np.testing.assert_allclose(inv[IDX], [1.0, 3.221070e-2, 3.333804e-5], rtol=RTOL_VEC)
  assert af == 1.0
  ratio = base_table(64, 1e4) / inv
  np.testing.assert_allclose(ratio[:9], 1.0, rtol=1e-6)  # 9 kept
  np.testing.assert_allclose(ratio[9:13], [1.309182, 1.745822, 2.328091, 3.104559],
                             rtol=RTOL_VEC)  # 4 smoothed
  np.testing.assert_allclose(ratio[13:], 4.0, rtol=1e-6)  # 19 divided


def test_llama31_d128():
  rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
  inv, _ = inv_af(rs, head_dim=128, rope_theta=5e5, max_position_embeddings=131072)
  ratio = base_table(128, 5e5) / inv
  assert np.sum(np.isclose(ratio, 1.0, rtol=1e-6)) == 29
  assert np.sum(np.isclose(ratio, 8.0, rtol=1e-6)) == 29
  assert ratio[29] == pytest.approx(1.2075, abs=1e-4)
  assert ratio[34] == pytest.approx(5.2573, abs=1e-4)


def test_longrope_switch_at_original():
  inv_none, af = inv_af(LONGROPE_A)
  inv_256, _ = inv_af(LONGROPE_A, seq_len=256)
  inv_257, af_257 = inv_af(LONGROPE_A, seq_len=257)
  assert af == pytest.approx(1.118034, abs=1e-6) and af_257 == af
  np.testing.assert_array_equal(inv_none, inv_256)  # init = short factors
  assert inv_256[10] == pytest.approx(5.623413e-2, rel=RTOL_VEC)
  np.testing.assert_allclose(inv_257[[10, 31]], [2.857800e-2, 3.333804e-5], rtol=RTOL_VEC)


@pytest.mark.parametrize("extra,max_pos,orig,af", [
  ({}, 131072, 4096, 1.190238),  # f = max_pos / original = 32
  ({"factor": 32.0}, 8192, 4096, 1.190238),
  ({"factor": 2.0}, 1024, 256, 1.060660),  # explicit factor wins over max_pos / original = 4
  ({}, 256, 256, 1.0),  # f <= 1
  ({"attention_factor": 1.5}, 1024, 256, 1.5),
])
def test_longrope_attention_factor(extra, max_pos, orig, af):
  rs = {**LONGROPE_A, "original_max_position_embeddings": orig, **extra}
  _, got = inv_af(rs, max_position_embeddings=max_pos)
  assert got == pytest.approx(af, abs=1e-6)


# --- normalisation


def test_validate_normalises():
  assert validate_rope_scaling(None, **A) is None
  assert validate_rope_scaling({}, **A) == {"rope_type": "default"}
  out = validate_rope_scaling(
    {"type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "rope_theta": 1e4}, **A)
  assert out == {
    "rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "beta_fast": 32.0,
    "beta_slow": 1.0, "truncate": True, "attention_factor": None, "mscale": None,
    "mscale_all_dim": None}
  assert validate_rope_scaling(out, **A) == out  # idempotent
  src = dict(LLAMA3_A)
  l3 = validate_rope_scaling(src, **A)
  assert l3["low_freq_factor"] == 1.0 and l3["high_freq_factor"] == 4.0
  assert src == LLAMA3_A  # input not mutated


# --- validation errors: each names the offending key

_BAD = [
  ({"rope_type": "nope"}, {}, "rope_type"),
  ({"rope_type": "nope"}, {}, "longrope"),  # lists the valid choices
  ({"rope_type": "yarn", "factor": 4.0}, {}, "original_max_position_embeddings"),
  ({"rope_type": "llama3", "factor": 4.0}, {}, "original_max_position_embeddings"),
  ({k: v for k, v in LONGROPE_A.items() if k != "original_max_position_embeddings"}, {},
   "original_max_position_embeddings"),
  ({"rope_type": "yarn", "original_max_position_embeddings": 256}, {}, "factor"),
  ({"rope_type": "llama3", "original_max_position_embeddings": 256}, {}, "factor"),
  ({"rope_type": "linear"}, {}, "factor"),
  ({"rope_type": "ntk"}, {}, "factor"),
  ({"rope_type": "dynamic", "factor": None}, {}, "factor"),
  ({"rope_type": "linear", "factor": 0.0}, {}, "factor"),
  ({"rope_type": "dynamic", "factor": -2.0}, {}, "factor"),
  ({"rope_type": "ntk", "factor": "4"}, {}, "factor"),
  ({**YARN_A, "factor": -1.0}, {}, "factor"),
  ({**LLAMA3_A, "factor": 0}, {}, "factor"),
  ({**LONGROPE_A, "factor": 0.0}, {}, "factor"),
  ({"rope_type": "linear", "factor": 2.0}, {"rope_theta": 0.0}, "rope_theta"),
  ({"rope_type": "linear", "factor": 2.0}, {"rope_theta": -1e4}, "rope_theta"),
  (None, {"rope_theta": 0.0}, "rope_theta"),
  ({"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}, {}, "rope_theta"),  # disagrees
  (None, {"head_dim": 63}, "head_dim"),
  ({"rope_type": "linear", "factor": 2.0}, {"head_dim": 63}, "head_dim"),
  (None, {"max_position_embeddings": 0}, "max_position_embeddings"),
  ({**LONGROPE_A, "short_factor": [1.0] * 31}, {}, "short_factor"),
  ({**LONGROPE_A, "long_factor": [1.0] * 33}, {}, "long_factor"),
  ({**LONGROPE_A, "long_factor": [1.0] * 31 + [-1.0]}, {}, "long_factor"),
  ({"rope_type": "linear", "factor": 2.0, "foo": 1}, {}, "foo"),
  ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32}, {}, "beta_fast"),
  ({"rope_type": "default", "factor": 2.0}, {}, "factor"),
  ({**YARN_A, "low_freq_factor": 1.0}, {}, "low_freq_factor"),
  ({**YARN_A, "original_max_position_embeddings": 256.5}, {}, "original_max_position_embeddings"),
  ({**YARN_A, "attention_factor": -1.0}, {}, "attention_factor"),
  ({**YARN_A, "truncate": None}, {}, "truncate"),
  ({**YARN_A, "beta_fast": "32"}, {}, "beta_fast"),
  ({**LLAMA3_A, "low_freq_factor": 4.0, "high_freq_factor": 4.0}, {}, "high_freq_factor"),
  ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, {}, "rope_type"),
]


@pytest.mark.parametrize("rs,dims,key", _BAD)
def test_validation_errors(rs, dims, key):
  with pytest.raises(ValueError, match=key):
    validate_rope_scaling(rs, **{**A, **dims})
  with pytest.raises(ValueError, match=key):  # rope_inv_freq validates too
    rope_inv_freq(rs, **{**A, **dims})


# --- apply_rope


def _scores(q_BTHD, k_BTHD):
  return jnp.einsum("bqhd,bkhd->bhqk", q_BTHD, k_BTHD)


def test_relative_position_property():
  rope = jax.jit(apply_rope)  # one compile instead of op-by-op dispatch
  kq, kk = jax.random.split(jax.random.PRNGKey(0))
  q = jax.random.normal(kq, (2, 16, 3, 64), jnp.float32) / 8.0  # unit-scale scores
  k = jax.random.normal(kk, (2, 16, 3, 64), jnp.float32)
  pos = jnp.stack([jnp.arange(16), jnp.arange(16) * 3 + 5]).astype(jnp.int32)
  for rs in [None, YARN_A, LLAMA3_A]:
    inv, af = rope_inv_freq(rs, **A)
    base = _scores(rope(q, pos, inv, af), rope(k, pos, inv, af))
    for c in (1, 37, 100):  # fp32 angle error grows with position (p * ulp(inv))
      shifted = _scores(rope(q, pos + c, inv, af), rope(k, pos + c, inv, af))
      np.testing.assert_allclose(shifted, base, atol=1e-4, rtol=1e-4)
  # attention_factor on cos and sin scales the scores by af^2
  inv, af = rope_inv_freq(YARN_A, **A)
  one = jnp.float32(1.0)
  s1 = _scores(rope(q, pos, inv, one), rope(k, pos, inv, one))
  s_af = _scores(rope(q, pos, inv, af), rope(k, pos, inv, af))
  np.testing.assert_allclose(s_af, s1 * float(af) ** 2, rtol=1e-5, atol=1e-5)


def test_apply_rope_explicit_values_and_dtype():
  # d 4: pairs (x0, x2) with inv 1 and (x1, x3) with inv 0.01; position 1; af 2.
  x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
  inv = jnp.array([1.0, 0.01], jnp.float32)
  out = np.asarray(apply_rope(x, jnp.array([[1]]), inv, 2.0)).ravel()
  c0, s0, c1, s1 = math.cos(1), math.sin(1), math.cos(0.01), math.sin(0.01)
  ref = 2.0 * np.array([1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1])
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  assert apply_rope(x.astype(jnp.bfloat16), jnp.array([[1]]), inv).dtype == jnp.bfloat16
  np.testing.assert_array_equal(apply_rope(x, jnp.array([[0]]), inv), x)  # position 0: identity


def test_rope_seq_len():
  s = rope_seq_len(jnp.array([[0, 5, 3], [9, 2, 1]]))
  assert s.dtype == jnp.int32 and int(s) == 10


# --- jit with a traced seq_len


@pytest.mark.parametrize("rs,max_pos,seq_lens", [
  (DYN4, 256, [1, 100, 256, 257, 1024, 2048, 5000]),
  (LONGROPE_A, 1024, [1, 255, 256, 257, 1000]),
])
def test_traced_seq_len_matches_eager(rs, max_pos, seq_lens):
  dims = {**A, "max_position_embeddings": max_pos}

  @jax.jit
  def f(pos_BT):
    return rope_inv_freq(rs, seq_len=rope_seq_len(pos_BT), **dims)

  for s in seq_lens:
    pos = jnp.maximum(jnp.arange(s - 4, s, dtype=jnp.int32), 0)[None]  # [1, 4], max = s-1
    inv_j, af_j = f(pos)
    inv_e, af_e = rope_inv_freq(rs, seq_len=s, **dims)
    np.testing.assert_allclose(inv_j, inv_e, rtol=1e-6)
    assert float(af_j) == pytest.approx(float(af_e))
  assert f._cache_size() == 1  # one trace serves every seq_len: no Python branch on it


def test_jit_apply_pipeline_longrope_switch():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 2, 64))

  @jax.jit
  def f(x, pos):
    inv, af = rope_inv_freq(LONGROPE_A, seq_len=rope_seq_len(pos), **A)
    return apply_rope(x, pos, inv, af)

  for last in (255, 256):  # seq_len 256 -> short, 257 -> long
    pos = jnp.arange(last - 3, last + 1)[None]
    inv, af = rope_inv_freq(LONGROPE_A, seq_len=last + 1, **A)
    np.testing.assert_allclose(f(x, pos), apply_rope(x, pos, inv, af), rtol=1e-5, atol=1e-6)
  short, _ = rope_inv_freq(LONGROPE_A, seq_len=256, **A)
  long, _ = rope_inv_freq(LONGROPE_A, seq_len=257, **A)
  assert not np.allclose(short, long)


# --- HF transformers parity


def _hf_config(rope_parameters, *, head_dim=64, rope_theta=1e4, max_position_embeddings=1024):
  transformers = pytest.importorskip("transformers")
  rp = {**rope_parameters, "rope_theta": rope_theta}
  return transformers.LlamaConfig(
    hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
    max_position_embeddings=max_position_embeddings, rope_parameters=rp, num_hidden_layers=1,
    intermediate_size=8, vocab_size=16)


def _hf_params(rs):
  """Our rope_scaling as HF wants it (HF has no llama3 defaults)."""
  rp = dict(rs or {"rope_type": "default"})
  if rp["rope_type"] == "llama3":
    rp.setdefault("low_freq_factor", 1.0)
    rp.setdefault("high_freq_factor", 4.0)
  return rp


_HF_CASES = [
  (None, None, {}),
  (None, None, {"rope_theta": 5e5, "head_dim": 128}),
  ({"rope_type": "default"}, None, {"rope_theta": 1e6}),
  ({"rope_type": "linear", "factor": 4.0}, None, {}),
  ({"rope_type": "linear", "factor": 2.5}, None, {"rope_theta": 5e5, "head_dim": 128}),
  *[(DYN4, s, {}) for s in (None, 10, 1024, 1025, 3000, 8192)],
  ({"rope_type": "dynamic", "factor": 2.0}, 16384,
   {"head_dim": 128, "max_position_embeddings": 4096}),
  (YARN_A, None, {}),
  ({**YARN_A, "truncate": False}, None, {}),
  ({**YARN_A, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5}, None, {}),
  ({**YARN_A, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707}, None, {}),
  ({**YARN_A, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.0}, None, {}),
  ({**YARN_A, "attention_factor": 0.8, "beta_fast": 16.0, "beta_slow": 2.0}, None, {}),
  (YARN_A, None, {"max_position_embeddings": 2048}),  # explicit factor vs ratio 8
  ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, None,
   {"head_dim": 128, "rope_theta": 5e5, "max_position_embeddings": 16384}),
  (LLAMA3_A, None, {}),
  ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}, None,
   {"head_dim": 128, "rope_theta": 5e5, "max_position_embeddings": 131072}),
  *[(LONGROPE_A, s, {}) for s in (None, 256, 257, 1024)],
  ({**LONGROPE_A, "factor": 2.0, "attention_factor": 1.3}, 300, {}),
]


@pytest.mark.hf
@pytest.mark.parametrize("rs,seq_len,dims", _HF_CASES)
def test_inv_freq_matches_transformers(rs, seq_len, dims):
  pytest.importorskip("torch")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

  cfg = _hf_config(_hf_params(rs), **dims)
  rope_type = cfg.rope_parameters["rope_type"]
  if rope_type == "default":  # not in ROPE_INIT_FUNCTIONS: lives in the model's rotary class
    hf_inv, hf_af = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
  else:
    hf_inv, hf_af = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)
  inv, af = inv_af(rs, seq_len=seq_len, **dims)
  np.testing.assert_allclose(inv, hf_inv.double().numpy(), rtol=1e-6)
  assert af == pytest.approx(float(hf_af), rel=1e-6)


@pytest.mark.hf
@pytest.mark.parametrize("rs,offset", [
  (None, 0), (YARN_A, 0), (LLAMA3_A, 100), (DYN4, 1500), (LONGROPE_A, 0), (LONGROPE_A, 200),
])
def test_apply_rope_matches_transformers(rs, offset):
  torch = pytest.importorskip("torch")
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

  B, T, H, D = 2, 64, 3, 64
  rng = np.random.default_rng(0)
  q = rng.standard_normal((B, T, H, D), dtype=np.float32)
  k = rng.standard_normal((B, T, H, D), dtype=np.float32)
  pos = np.stack([np.arange(T) + offset, np.arange(T) * 2 + offset // 2]).astype(np.int64)

  rotary = LlamaRotaryEmbedding(_hf_config(_hf_params(rs)))
  with torch.no_grad():  # forward runs HF's dynamic / longrope update from max(position_ids)
    cos, sin = rotary(torch.from_numpy(q), torch.from_numpy(pos))
    hq, hk = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin,
                                  unsqueeze_dim=2)  # [B, T, H, D] layout
  hf_inv = jnp.asarray(rotary.inv_freq.numpy())
  hf_af = float(rotary.attention_scaling)
  pos_j = jnp.asarray(pos, jnp.int32)

  # 1. HF's own inv_freq and af: layout, af on cos and sin, float32 angles agree tightly.
  for x, ref in ((q, hq), (k, hk)):
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), pos_j, hf_inv, hf_af), ref.numpy(),
                               atol=1e-5, rtol=1e-5)

  # 2. Full pipeline. Our tables follow HF's float32 arithmetic, but torch's vectorised pow can
  # differ by ~1 ulp on some CPUs, which moves angles by ~p * 2^-23 rad: the tolerance grows
  # with position.
  inv, af = rope_inv_freq(rs, seq_len=rope_seq_len(pos_j), **A)
  np.testing.assert_allclose(inv, hf_inv, rtol=1e-6)
  assert float(af) == pytest.approx(hf_af, rel=1e-6)
  atol = 2e-5 + 2 * np.finfo(np.float32).eps * pos.max() * np.abs(q).max()
  for x, ref in ((q, hq), (k, hk)):
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), pos_j, inv, af), ref.numpy(),
                               atol=atol, rtol=1e-5)
