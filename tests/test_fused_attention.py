"""Vendor kernels (jax.nn.dot_product_attention XLA/cuDNN, Pallas splash) equal the reference,
and `auto` / forced kernels fail loudly where they cannot compute a call exactly.

Positions that are not 0..T-1 (PoSE jumps, randomized sorted ids, packing that restarts per
document) against every pattern: a kernel either equals `reference` or refuses, and `auto`
(posing as CPU, GPU and TPU) never picks one that disagrees. Splash runs in the Pallas
interpreter; cuDNN cannot run on CPU, so its refusal logic is tested, and its call is run with
the XLA implementation of the same jax.nn.dot_product_attention (mask/bias as cuDNN gets them).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention import attend, blockwise, fused, make_pattern
from ctxjax.positions.alibi import alibi_slopes
from ctxjax.positions.generators import pose_positions_from, randomized_positions


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


# ---------------------------------------------------------------------------------------------
# Every positions kind x every pattern. T = 128: one splash block.
# ---------------------------------------------------------------------------------------------

B, T, H, K, D = 2, 128, 4, 2, 16
DOCS = (40, 50, 38)  # packed documents, positions restarting at 0 in each


def _positions(kind):
  """int32 [B, T] positions and [B, T] segment ids for one positions kind."""
  ones = jnp.ones((B, T), jnp.int32)
  if kind == "contiguous":
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), ones
  if kind == "pose":  # PoSE (Zhu et al. 2024): chunk 2 shifted by a skip
    return jnp.broadcast_to(pose_positions_from(T, 50, 300), (B, T)), ones
  if kind == "randomized":  # Ruoss et al. 2023: sorted distinct ids from [0, 4T)
    return randomized_positions(jax.random.PRNGKey(1), B, T, 4 * T), ones
  assert kind == "packed"
  pos = jnp.concatenate([jnp.arange(n, dtype=jnp.int32) for n in DOCS])
  seg = jnp.concatenate([jnp.full(n, i + 1, jnp.int32) for i, n in enumerate(DOCS)])
  return jnp.broadcast_to(pos, (B, T)), jnp.broadcast_to(seg, (B, T))


POSITIONS = ("contiguous", "pose", "randomized", "packed")
CONTIGUOUS_IN_SEGMENTS = ("contiguous", "packed")  # step 1 per token within each segment
PATTERNS = {"causal": {}, "sliding_window": {"window": 16}, "lambda": {"n_global": 4, "n_local": 16},
            "attention_sinks": {"sink_size": 4, "window": 16}, "block_causal": {"block_size": 32},
            "full": {}}


@functools.lru_cache(maxsize=None)
def _qkv(dtype):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(ks[0], (B, T, H, D)).astype(dtype),
          jax.random.normal(ks[1], (B, T, K, D)).astype(dtype),
          jax.random.normal(ks[2], (B, T, K, D)).astype(dtype))


def _run(kernel, positions, kind, dtype=jnp.float32, alibi=False, grads=False):
  """kernel's (output, grads or None) for the case; one array object each for q/k positions and
  segment ids (self-attention, as the model calls it)."""
  pos, seg = _positions(positions)
  kwargs = dict(q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
                pattern=make_pattern(kind, **PATTERNS[kind]),
                alibi_slopes=alibi_slopes(H) if alibi else None)

  def loss(q, k, v):
    out = kernel(q, k, v, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out
  q, k, v = _qkv(dtype)
  if not grads:
    return jax.jit(lambda q, k, v: loss(q, k, v)[1])(q, k, v), None
  (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, g


@functools.lru_cache(maxsize=None)
def _reference(positions, kind, dtype=jnp.float32, alibi=False, grads=False):
  return _run(functools.partial(attend, impl="reference"), positions, kind, dtype, alibi, grads)


def _assert_equal(got, want, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                             atol=atol)
  for a, b in zip(got[1] or (), want[1] or ()):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol)


@pytest.mark.parametrize("kind", PATTERNS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_xla_equals_reference_for_any_positions(positions, kind):
  grads = positions in ("pose", "packed")  # gradients on half the cases, to keep this short
  got = _run(fused.xla_attention, positions, kind, grads=grads)
  _assert_equal(got, _reference(positions, kind, grads=grads))


def _splash_expected_ok(positions, kind, contiguous):
  return kind == "full" or (kind in ("causal", "sliding_window") and contiguous)


@pytest.mark.slow
@pytest.mark.parametrize("kind", PATTERNS)
@pytest.mark.parametrize("positions, contiguous", [
    (p, False) for p in POSITIONS] + [(p, True) for p in CONTIGUOUS_IN_SEGMENTS])
def test_splash_equals_reference_or_refuses(monkeypatch, positions, kind, contiguous):
  """Pallas interpret mode. contiguous_positions=True only where it is true."""
  monkeypatch.setenv("CTXJAX_SPLASH_INTERPRET", "1")
  kernel = functools.partial(fused.splash_attention, contiguous_positions=contiguous)
  if not _splash_expected_ok(positions, kind, contiguous):
    with pytest.raises(ValueError) as err:
      _run(kernel, positions, kind)
    assert "\n" not in str(err.value) and "use impl=" in str(err.value)
    return
  grads = kind != "full" or positions == "pose"  # gradients on a few, to keep this short
  _assert_equal(_run(kernel, positions, kind, grads=grads),
                _reference(positions, kind, grads=grads))


@pytest.mark.slow
def test_splash_index_window_is_wrong_for_pose_hence_the_flag(monkeypatch):
  """Why contiguous_positions defaults to False: promised falsely for PoSE positions, splash's
  index-based window covers the wrong keys (the error issue #18 measured)."""
  monkeypatch.setenv("CTXJAX_SPLASH_INTERPRET", "1")
  wrong = functools.partial(fused.splash_attention, contiguous_positions=True)
  got, _ = _run(wrong, "pose", "sliding_window")
  want, _ = _reference("pose", "sliding_window")
  assert float(jnp.max(jnp.abs(got - want))) > 0.1


def test_splash_refusals_name_the_reason(monkeypatch):
  monkeypatch.setenv("CTXJAX_SPLASH_INTERPRET", "1")
  q, k, _ = _qkv(jnp.float32)
  pos, seg = _positions("contiguous")
  why = functools.partial(fused.splash_unsupported, q, k, q_positions=pos, k_positions=pos,
                          q_segment_ids=seg, k_segment_ids=seg)
  causal = make_pattern("causal")
  assert why(pattern=causal, contiguous_positions=True) is None
  assert "contiguous_positions=True" in why(pattern=causal)
  assert "ALiBi" in why(pattern=causal, alibi_slopes=alibi_slopes(H), contiguous_positions=True)
  assert "absolute positions" in why(pattern=make_pattern("block_causal"),
                                     contiguous_positions=True)
  # Queries and keys from different arrays (cross-attention, a cache): rows may see no key.
  assert "self-attention" in fused.splash_unsupported(
      q, k, q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg + 0,
      pattern=make_pattern("full"))
  assert "self-attention" in fused.splash_unsupported(
      q, k, q_positions=pos, k_positions=pos + 0, q_segment_ids=seg, k_segment_ids=seg,
      pattern=causal, contiguous_positions=True)


def test_cudnn_refusals_name_the_reason(monkeypatch):
  q32, k32, _ = _qkv(jnp.float32)
  q16, k16, _ = _qkv(jnp.bfloat16)
  monkeypatch.setattr(fused, "_backend", lambda: "cpu")
  assert "needs a GPU" in fused.cudnn_unsupported(q16, k16, pattern=make_pattern("causal"))
  monkeypatch.setattr(fused, "_backend", lambda: "gpu")
  assert fused.cudnn_unsupported(q16, k16, pattern=make_pattern("causal")) is None
  assert "bfloat16/float16" in fused.cudnn_unsupported(q32, k32, pattern=make_pattern("causal"))
  assert "causal/full" in fused.cudnn_unsupported(q16, k16, pattern=make_pattern("lambda"))


def _xla_for_cudnn(real):
  """jax.nn.dot_product_attention that runs implementation="cudnn" as "xla" (same mask/bias)."""
  calls = []

  def stand_in(*args, implementation=None, **kwargs):
    calls.append(implementation)
    return real(*args, implementation="xla" if implementation == "cudnn" else implementation,
                **kwargs)
  stand_in.calls = calls
  return stand_in


@functools.lru_cache(maxsize=None)
def _kernel_result(choice, positions, kind, dtype, alibi):
  """The output of the kernel `auto` chose (cached: each backend's choice shares them)."""
  kernel = {"blockwise": blockwise.blockwise_attention, "splash": fused.splash_attention,
            "cudnn": fused.cudnn_attention}[choice]
  return _run(kernel, positions, kind, dtype, alibi)


CASES = [(p, kind, jnp.float32, False) for p in POSITIONS for kind in PATTERNS] + [
    (p, kind, jnp.bfloat16, False) for p in POSITIONS for kind in PATTERNS] + [
    (p, "causal", dtype, True) for p in POSITIONS for dtype in (jnp.float32, jnp.bfloat16)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_auto_never_selects_a_kernel_that_disagrees_with_reference(monkeypatch, backend):
  monkeypatch.setattr(fused, "_backend", lambda: backend)
  monkeypatch.setenv("CTXJAX_SPLASH_INTERPRET", "1")
  monkeypatch.setattr(jax.nn, "dot_product_attention", _xla_for_cudnn(jax.nn.dot_product_attention))
  chosen = set()
  for positions, kind, dtype, alibi in CASES:
    pos, seg = _positions(positions)
    q, k, _ = _qkv(dtype)
    choice = fused.select_kernel(q, k, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                                 k_segment_ids=seg, pattern=make_pattern(kind, **PATTERNS[kind]),
                                 alibi_slopes=alibi_slopes(H) if alibi else None)
    chosen.add(choice)
    # What auto may pick: splash only where position-free, cuDNN only with its explicit mask.
    if choice == "splash":
      assert backend == "tpu" and kind == "full" and not alibi
    if choice == "cudnn":
      assert backend == "gpu" and dtype == jnp.bfloat16 and kind in ("causal", "full")
    atol = 1e-5 if dtype == jnp.float32 else 3e-2
    _assert_equal(_kernel_result(choice, positions, kind, dtype, alibi),
                  _reference(positions, kind, dtype, alibi), atol=atol)
  assert chosen == {"cpu": {"blockwise"}, "gpu": {"blockwise", "cudnn"},
                    "tpu": {"blockwise", "splash"}}[backend]


def test_auto_is_the_selected_kernel(monkeypatch):
  """auto_attention runs what select_kernel names (posing as a GPU: cuDNN via the stand-in)."""
  monkeypatch.setattr(fused, "_backend", lambda: "gpu")
  stand_in = _xla_for_cudnn(jax.nn.dot_product_attention)
  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  got = _run(functools.partial(attend, impl="auto"), "pose", "causal", jnp.bfloat16)
  assert stand_in.calls == ["cudnn"]
  _assert_equal(got, _reference("pose", "causal", jnp.bfloat16), atol=3e-2)


_SPLASH_ON_A_MESH = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["CTXJAX_SPLASH_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ctxjax.attention import attend, fused, make_pattern
pos = np.concatenate([np.arange(40), np.arange(88)]).astype(np.int32)
seg = np.concatenate([np.ones(40), np.full(88, 2)]).astype(np.int32)
pos, seg = np.tile(pos, (4, 1)), np.tile(seg, (4, 1))
ks = jax.random.split(jax.random.PRNGKey(0), 3)
q, k, v = (jax.random.normal(key, (4, 128, n, 16)) for key, n in zip(ks, (4, 2, 2)))

def loss(kernel, q, k, v, pos, seg):
  out = kernel(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
               pattern=make_pattern("causal"))
  return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

splash = lambda *a, **kw: fused.splash_attention(*a, contiguous_positions=True, **kw)
want = jax.jit(jax.value_and_grad(lambda *a: loss(attend, *a), argnums=(0, 1, 2), has_aux=True))
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
with jax.set_mesh(mesh):
  args = [put(x, P(("data", "fsdp"), None, "tensor", None)) for x in (q, k, v)]
  args += [put(x, P(("data", "fsdp"), None)) for x in (pos, seg)]
  run = jax.jit(jax.value_and_grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2), has_aux=True))
  got = run(*args)
  hlo = run.lower(*args).compile().as_text()
diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got, want(q, k, v, pos, seg))
print("MAXDIFF", max(jax.tree.leaves(diffs)), "SHARD_MAP", "shmap" in hlo or "shard_map" in hlo)
"""


@pytest.mark.slow
def test_splash_runs_per_device_on_a_mesh_and_equals_reference():
  """8 fake CPU devices, batch over (data, fsdp), kv heads over tensor: the shard_map wrapper
  (XLA does not partition Mosaic kernels; tests/test_aot.py compiles it for a TPU mesh) keeps
  splash's values and gradients equal to the reference's (Pallas interpreter)."""
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SPLASH_ON_A_MESH, root], capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("MAXDIFF")][-1].split()
  assert float(line[1]) < 1e-4 and line[3] == "True", line  # exact, and run in a shard_map


# ---------------------------------------------------------------------------------------------
# The model's promise: packed positions step by 1 within each segment (attend's
# contiguous_positions), checked on the device.
# ---------------------------------------------------------------------------------------------

def _rows(pos, seg):
  return jnp.asarray(pos, jnp.int32)[None], jnp.asarray(seg, jnp.int32)[None]


@pytest.mark.parametrize("pos, seg, contiguous", [
    ([0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1], True),
    ([7, 8, 0, 1, 2, 0], [1, 1, 2, 2, 2, 3], True),    # packed: restarts, a continued document
    ([0, 1, 2, 3, 4, 5], [1, 1, 2, 2, 3, 3], True),    # continuous positions over documents
    ([0, 1, 0, 1, 0, 0], [1, 1, 2, 2, 0, 0], False),   # padding at position 0
    ([0, 1, 5, 6, 7, 8], [1, 1, 1, 1, 1, 1], False),   # PoSE's skip
    ([5, 6, 0, 1, 0, 1], [1, 1, 2, 2, 1, 1], False),   # segment 1 comes back: 0 < 6 by position
    ([0, 1, 0, 1, 2, 3], [1, 1, 2, 2, 1, 1], False),   # ... even where each run steps by 1
])
def test_contiguous_by_segment(pos, seg, contiguous):
  assert bool(fused.contiguous_by_segment(*_rows(pos, seg))) is contiguous


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal", "sliding_window"])
def test_vouched_auto_runs_splash_on_tpu_and_poisons_a_broken_promise(monkeypatch, kind):
  """attend(impl="auto", contiguous_positions=True) posing as a TPU: splash (Pallas
  interpreter) equal to the reference for packed rows, gradients included; for PoSE rows the
  promise is false and every output is NaN, never a silently different attention."""
  monkeypatch.setattr(fused, "_backend", lambda: "tpu")
  monkeypatch.setenv("CTXJAX_SPLASH_INTERPRET", "1")
  ran = []
  real = fused.splash_attention
  monkeypatch.setattr(fused, "splash_attention", lambda *a, **kw: ran.append(1) or real(*a, **kw))
  vouched = functools.partial(attend, impl="auto", contiguous_positions=True)
  _assert_equal(_run(vouched, "packed", kind, grads=True),
                _reference("packed", kind, grads=True))
  assert ran  # splash, not blockwise
  broken, _ = _run(vouched, "pose", kind)
  assert bool(jnp.all(jnp.isnan(broken)))


def test_the_promise_reaches_only_kernels_that_take_it():
  """Every other kernel ignores contiguous_positions (they are exact for any positions)."""
  q, k, v = _qkv(jnp.float32)
  pos, seg = _positions("packed")
  for impl in ("reference", "blockwise", "xla"):
    out = attend(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                 k_segment_ids=seg, pattern=make_pattern("causal"), impl=impl,
                 contiguous_positions=True)
    _assert_equal((out, None), _reference("packed", "causal"))


def test_a_forced_splash_never_takes_the_promise_unchecked(monkeypatch):
  """attend hands contiguous_positions only to `auto`, which checks it: impl="splash" on a
  causal call is still refused, so a false promise cannot reach it unchecked."""
  monkeypatch.setattr(fused, "_backend", lambda: "tpu")
  monkeypatch.setenv("CTXJAX_SPLASH_INTERPRET", "1")
  with pytest.raises(ValueError, match="contiguous_positions=True"):
    _run(functools.partial(attend, impl="splash", contiguous_positions=True), "pose", "causal")
