"""LongQLoRA's quantized frozen base (ctxjax/model/quant.py): the NF4 table, nibble packing,
int8/NF4 round-trip error bounds, the parameter layout, and the quantized forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_cases as cases
from ctxjax.model import Transformer, lora, quant
from ctxjax.model import params as params_lib

# QLoRA (Dettmers et al. 2023), Appendix E / bitsandbytes' NF4 table, as published.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
NF4_HALF_GAP = float(np.max(np.diff(PUBLISHED_NF4))) / 2  # 0.1385: worst rounding, in absmax


def test_nf4_codebook_is_the_published_table():
  assert quant.NF4.dtype == np.float32
  np.testing.assert_array_equal(quant.NF4, np.asarray(PUBLISHED_NF4, np.float32))


def test_pack_unpack_is_exact_and_high_nibble_first():
  codes = jnp.asarray([[1, 15], [2, 0], [0, 7], [9, 3]], jnp.uint8)  # [2n=4, out=2]
  packed = quant.pack_nibbles(codes)
  np.testing.assert_array_equal(packed, [[0x12, 0xF0], [0x09, 0x73]])
  every = jnp.asarray(np.stack(np.meshgrid(np.arange(16), np.arange(16))).reshape(2, -1).T
                      .reshape(-1, 1), jnp.uint8)  # all 256 (high, low) pairs
  packed = quant.pack_nibbles(every)
  assert sorted(np.asarray(packed).ravel().tolist()) == list(range(256))
  np.testing.assert_array_equal(quant.unpack_nibbles(packed), every)


def test_int8_hand_vector():
  w = jnp.asarray([[0.5], [-1.0], [0.25], [0.0], [0.0], [0.0], [0.0], [0.0]])  # 2 blocks of 4
  codes, absmax = quant.int8_quantize(w, 1, 4)
  np.testing.assert_array_equal(codes[:, 0], [64, -127, 32, 0, 0, 0, 0, 0])  # 63.5 -> 64
  np.testing.assert_array_equal(absmax, [[1.0], [0.0]])  # an all-zero block stays exactly zero
  np.testing.assert_array_equal(quant.int8_dequantize(codes, absmax, 1, 4)[:, 0],
                                np.float32([64, -127, 32, 0, 0, 0, 0, 0]) / 127)


def test_nf4_hand_vector_rounds_to_the_nearest_level():
  levels = np.asarray(PUBLISHED_NF4, np.float32)
  x = np.float32([-1.0, 0.04, 0.039, 0.9, 0.2, -0.6, 0.5, 0.0])  # absmax 1 (the first entry)
  codes, absmax = quant.nf4_quantize(jnp.asarray(x)[:, None], 1, 8)
  idx = np.asarray(quant.unpack_nibbles(codes))[:, 0]
  np.testing.assert_array_equal(idx, np.argmin(np.abs(x[:, None] - levels), axis=1))
  np.testing.assert_array_equal(idx, [0, 8, 7, 15, 9, 2, 12, 7])
  np.testing.assert_array_equal(quant.nf4_dequantize(codes, absmax, 1, 8)[:, 0], levels[idx])


@pytest.mark.parametrize("fmt,bound", [("int8", 1 / 254), ("nf4", NF4_HALF_GAP)])
@pytest.mark.parametrize("shape,n_in", [((64, 3, 8), 1), ((4, 8, 16), 2)])  # q_proj / o_proj
def test_round_trip_error_bound(fmt, bound, shape, n_in):
  w = jnp.asarray(np.random.default_rng(0).normal(0, 0.05, shape), jnp.float32)
  f = quant.FORMATS[fmt]
  quantize = jax.jit(f.quantize, static_argnums=(1, 2))
  codes, absmax = quantize(w, n_in, 16)
  assert codes.dtype == f.dtype and codes.shape == f.codes_shape(shape, n_in)
  assert absmax.shape == (np.prod(shape[:n_in]) // 16, *shape[n_in:])
  back = jax.jit(f.dequantize, static_argnums=(2, 3))(codes, absmax, n_in, 16)
  blocks = np.asarray(w).reshape(-1, 16, np.prod(shape[n_in:]))
  np.testing.assert_array_equal(absmax.reshape(blocks.shape[0], -1), np.abs(blocks).max(1))
  err = np.abs(np.asarray(back) - np.asarray(w)).reshape(blocks.shape)
  limit = bound * np.asarray(absmax).reshape(blocks.shape[0], 1, -1)
  assert np.all(err <= limit * (1 + 1e-6) + 1e-12)
  assert np.max(err / limit) > 0.9  # the bound is tight: the test could fail
  # Re-quantizing the dequantized weights reproduces the codes exactly.
  np.testing.assert_array_equal(quantize(back, n_in, 16)[0], codes)


@pytest.fixture(scope="module")
def float_base():
  cfg = cases.config()
  return cfg, cases.random_params(cfg, seed=1, std=0.02)  # initializer_range-sized weights


@pytest.fixture(scope="module")
def reference_logits(float_base):
  cfg, params = float_base
  return jax.jit(Transformer(cfg).apply)({"params": params}, cases.tokens())


@pytest.mark.parametrize("scan_layers,fmt,code_bytes", [(True, "int8", 1.0), (True, "nf4", 0.5),
                                                       (False, "nf4", 0.5)])
def test_quantize_params_layout_and_bytes(scan_layers, fmt, code_bytes):
  cfg = cases.config(scan_layers=scan_layers)
  params = cases.random_params(cfg, seed=1, std=0.02)
  n_block = sum(x.size for p, x in params_lib.flatten(params).items()
                if p.split("/")[-2] in lora.BLOCK_PROJECTIONS)
  qcfg = cases.config(scan_layers=scan_layers, base_quantization=fmt)
  q = params_lib.quantize_params(params, qcfg)
  expected = params_lib.abstract_params(qcfg)
  assert {p: (x.shape, x.dtype) for p, x in params_lib.flatten(q).items()} == {
      p: (x.shape, x.dtype) for p, x in expected.items()}
  in_codes = params_lib.weight_bytes(q, lambda p: p.endswith(quant.FORMATS[fmt].codes_name))
  in_absmax = params_lib.weight_bytes(q, lambda p: p.endswith(quant.ABSMAX))
  assert in_codes == n_block * code_bytes and in_absmax == n_block // 16 * 4
  untouched = lambda p: "lm_head" in p or "embed" in p or "norm" in p
  assert params_lib.weight_bytes(q, untouched) == params_lib.weight_bytes(params, untouched)
  back = params_lib.flatten(params_lib.dequantize_params(q, qcfg))
  bound = 1 / 254 if fmt == "int8" else NF4_HALF_GAP
  for path, w in params_lib.flatten(params).items():
    tol = bound * float(np.abs(w).max())
    np.testing.assert_allclose(back[path], w, atol=tol * 1.0001 + 1e-12, rtol=0)


def test_quantized_projection_output_within_its_bound_and_frozen():
  """One projection: |x (W - Q(W))| <= |x| @ (per-weight bound); no gradient reaches the base."""
  from ctxjax.model.layers import block_projection
  cfg = cases.config(base_quantization="int8")
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(0, 1, (3, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(0, 0.1, (32, 4, 8)), jnp.float32)
  codes, absmax = jax.jit(quant.int8_quantize, static_argnums=(1, 2))(w, 1, 16)
  proj = block_projection(cfg, "q_proj", (32, 4, 8), ("embed", "heads", "head_dim"))
  apply = lambda s: proj.apply({"params": {"kernel_int8": codes, "kernel_absmax": s}}, x)
  y, grad = jax.jit(lambda s: (apply(s), jax.grad(lambda s: jnp.sum(apply(s)))(s)))(absmax)
  x, w, y, absmax = (np.asarray(a, np.float64) for a in (x, w, y, absmax))
  err = np.abs(y - np.einsum("be,ehd->bhd", x, w))
  bound = np.einsum("be,ehd->bhd", np.abs(x), np.repeat(absmax / 254, 16, axis=0))
  assert np.all(err <= bound * 1.001 + 1e-6) and err.max() > 0
  assert not np.any(np.asarray(grad))  # stop_gradient: the frozen base gets no gradient


# Logits error of the whole model (weights N(0, 0.02), blocks of 16), measured 2026-11-22:
# int8 mean 0.24% / max 1.3%, nf4 mean 5.0% / max 29%, relative to the logits' spread.
@pytest.mark.parametrize("fmt,mean_rel,max_rel", [("int8", 0.01, 0.05), ("nf4", 0.15, 0.6)])
def test_quantized_model_close_to_float(float_base, reference_logits, fmt, mean_rel, max_rel):
  cfg, params = float_base
  qcfg = cases.config(base_quantization=fmt, lora_rank=4)
  qparams = params_lib.init_from_base(params, qcfg, jax.random.PRNGKey(0))
  out = jax.jit(Transformer(qcfg).apply)({"params": qparams}, cases.tokens())
  ref = reference_logits
  err = jnp.abs(out - ref)
  spread = jnp.mean(jnp.abs(ref - jnp.mean(ref)))
  assert 0 < float(jnp.mean(err) / spread) < mean_rel
  assert float(jnp.max(err) / jnp.std(ref)) < max_rel


def test_bad_quantization_config():
  with pytest.raises(ValueError, match=r"base_quantization='fp4'.*'int8', 'nf4', 'none'"):
    cases.config(base_quantization="fp4")
  with pytest.raises(ValueError, match=r"quant_block_size=24 must divide.*hidden_size"):
    cases.config(base_quantization="int8", quant_block_size=24)
  with pytest.raises(ValueError, match="quant_block_size must be a positive integer"):
    cases.config(quant_block_size=0)
