"""Vendor kernels (jax.nn.dot_product_attention XLA/cuDNN, Pallas splash) equal the reference,
and `auto` / forced kernels fail loudly where they cannot express a call."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention import attend, make_pattern
from ctxjax.positions.alibi import alibi_slopes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(batch=2, length=64, heads=4, kv_heads=2, dim=16, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (batch, length, heads, dim))
  k = jax.random.normal(ks[1], (batch, length, kv_heads, dim))
  v = jax.random.normal(ks[2], (batch, length, kv_heads, dim))
  pos = jnp.concatenate([jnp.arange(23), jnp.arange(length - 23)])[None].repeat(batch, 0)
  seg = jnp.concatenate([jnp.ones(23, jnp.int32), jnp.full(length - 23, 2, jnp.int32)])
  return q, k, v, pos.astype(jnp.int32), seg[None].repeat(batch, 0)


def _loss_and_grads(impl, pattern, alibi, q, k, v, pos, seg):
  def loss(q, k, v):
    out = attend(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                 k_segment_ids=seg, pattern=pattern, alibi_slopes=alibi, impl=impl)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("impl", ["xla", "auto"])
@pytest.mark.parametrize("pattern, alibi", [
    (dict(kind="causal"), False), (dict(kind="causal"), True), (dict(kind="full"), False),
    (dict(kind="sliding_window", window=9), True)])
def test_kernel_equals_reference_values_and_gradients(impl, pattern, alibi):
  q, k, v, pos, seg = _inputs()
  pattern = make_pattern(**pattern)
  slopes = alibi_slopes(4) if alibi else None
  want, want_g = _loss_and_grads("reference", pattern, slopes, q, k, v, pos, seg)
  got, got_g = _loss_and_grads(impl, pattern, slopes, q, k, v, pos, seg)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for a, b in zip(got_g, want_g):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_xla_kernel_zeroes_rows_that_see_no_key():
  q, k, v, pos, seg = _inputs(length=32)
  kseg = jnp.full_like(seg, 7)  # no query shares a segment with any key
  out = attend(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=kseg,
               pattern=make_pattern("full"), impl="xla")
  assert float(jnp.max(jnp.abs(out))) == 0.0


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the non-GPU refusal")
def test_forced_cudnn_off_gpu_names_what_is_missing():
  q, k, v, pos, seg = _inputs()
  with pytest.raises(ValueError, match="cudnn attention needs a GPU"):
    attend(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
           pattern=make_pattern("causal"), impl="cudnn")


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the non-TPU refusal")
def test_forced_splash_off_tpu_names_what_is_missing():
  q, k, v, pos, seg = _inputs()
  with pytest.raises(ValueError, match="splash attention needs a TPU"):
    attend(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
           pattern=make_pattern("causal"), impl="splash")


SPLASH_WORKER = r"""
import json, jax, jax.numpy as jnp, numpy as np
from ctxjax.attention import attend, make_pattern
from ctxjax.attention.fused import splash_unsupported
ks = jax.random.split(jax.random.PRNGKey(0), 3)
B, T, H, K, D = 1, 256, 4, 2, 64
q = jax.random.normal(ks[0], (B, T, H, D)); k = jax.random.normal(ks[1], (B, T, K, D))
v = jax.random.normal(ks[2], (B, T, K, D))
pos = jnp.arange(T)[None].astype(jnp.int32)
seg = (1 + (jnp.arange(T) >= 150)).astype(jnp.int32)[None]
res = {}
for kind, kw in (("causal", {}), ("sliding_window", {"window": 64})):
  pat = make_pattern(kind, **kw)
  def f(impl):
    out = lambda q, k, v: attend(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                                 k_segment_ids=seg, pattern=pat, impl=impl)
    o, vjp = jax.vjp(out, q, k, v)
    return (o,) + vjp(jnp.cos(o))
  got, want = f("splash"), f("reference")
  res[kind] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))
res["alibi_refused"] = splash_unsupported(q, k, make_pattern("causal"), np.ones(4)) is not None
print(json.dumps(res))
"""


@pytest.mark.slow
def test_splash_kernel_in_pallas_interpret_mode_equals_reference():
  env = {**os.environ, "CTXJAX_SPLASH_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SPLASH_WORKER], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if proc.returncode != 0 and "interpret" in proc.stderr.lower() and "not" in proc.stderr.lower():
    pytest.skip("this jax's Pallas TPU interpreter cannot run splash on CPU: "
                + proc.stderr.strip().splitlines()[-1])
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res["causal"] < 1e-4 and res["sliding_window"] < 1e-4, res
  assert res["alibi_refused"]
