"""Multi-device checks for ctxjax.attention.ring and context_parallel, run by
tests/test_ring_attention.py in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set
before jax is imported, and the main pytest process has one device).

Prints one JSON line per case:
  {"case": "grad", "n", "pattern", "layout", "data", "impl", "err": {out,dq,dk,dv}, "scale"}
  {"case": "registry", ...}  attend(impl=...) inside jit under jax.set_mesh (2-D explicit mesh)
  {"case": "padded", ...}    shards that need padding to a block multiple
  {"case": "s2", ...}        LongLoRA S2-Attn on ring / all_gather vs on the reference kernel
  {"case": "error", "name", "ok", "message"}
and a final {"case": "done", "seconds"}. Errors (max |ring - reference|) are computed inside jit;
one compilation per (device count, pattern), all layouts and data variants share it (the layout
permutation and its inverse are traced arguments).
"""
from __future__ import annotations

import os

# Backend optimisation level 0: ~3x faster XLA:CPU compiles (compilation dominates this file's
# runtime); the numerics checked here do not depend on it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

from ctxjax.attention import attend, make_pattern  # noqa: E402
from ctxjax.attention import context_parallel as cp  # noqa: E402
from ctxjax.attention import layouts, ring  # noqa: E402
from ctxjax.attention.reference import reference_attention  # noqa: E402

B, T, H, KV, D = 2, 96, 4, 2, 16  # GQA: 2 query heads per kv head; T divisible by 2*8
SLOPES = np.asarray([2.0 ** (-8.0 * i / H) for i in range(1, H + 1)], np.float32)  # ALiBi
PATTERNS = {"causal": make_pattern("causal"),
            "sliding_window": make_pattern("sliding_window", window=11)}


def emit(**kw):
  print(json.dumps(kw), flush=True)


def packed_segments(t):
  """Documents of uneven lengths that cross every shard boundary; row 1 ends in padding (0)."""
  seg = np.zeros((B, t), np.int32)
  seg[0] = np.repeat([1, 2, 3], [37, 30, t - 67])
  seg[1, : t - 7] = np.repeat([4, 5], [9, t - 16])
  return seg


def packed_positions(seg):
  pos = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for i in range(1, seg.shape[1]):
      pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
  return pos


def data_variants():
  """name -> (positions, segment ids, ALiBi slopes) in the natural token order."""
  plain_pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  seg = packed_segments(T)
  return {
      "plain": (plain_pos, np.ones((B, T), np.int32), np.zeros(H, np.float32)),
      "packed_alibi": (packed_positions(seg), seg, SLOPES),
  }


def random_inputs(seed=0, h=H, kv=KV, t=T):
  rng = np.random.default_rng(seed)
  shapes = [(B, t, h, D), (B, t, kv, D), (B, t, kv, D), (B, t, h, D)]
  return [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]


def max_errs(got, want):
  return {name: jnp.max(jnp.abs(g - w)) for name, g, w in zip(("out", "dq", "dk", "dv"), got,
                                                               want)}


def vjp_all(fn, q, k, v, do):
  out, pull = jax.vjp(fn, q, k, v)
  return (out,) + tuple(pull(do))


def make_check(mesh, n, pattern, block="chunk"):
  """jit: reference on natural order vs ring / all_gather on the permuted layout. block:
  "chunk" = one zigzag chunk (exercises block skipping inside a shard pair), None = automatic."""
  block = T // n // 2 if block == "chunk" else block

  @jax.jit
  def check(q, k, v, do, pos, seg, slopes, perm, inv):
    kw = dict(q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
              pattern=pattern, alibi_slopes=slopes)
    want = vjp_all(lambda q, k, v: reference_attention(q, k, v, **kw), q, k, v, do)
    lay = lambda x: jnp.take(x, perm, axis=1)
    unlay = lambda x: jnp.take(x, inv, axis=1)
    errs = {}
    for impl in cp.STRATEGIES:
      def fn(q, k, v, impl=impl):
        out = cp.context_parallel_attend(
            lay(q), lay(k), lay(v), q_positions=lay(pos), k_positions=lay(pos),
            q_segment_ids=lay(seg), k_segment_ids=lay(seg), pattern=pattern,
            alibi_slopes=slopes, mesh=mesh, strategy=impl, block_q=block, block_k=block)
        return unlay(out)
      errs[impl] = max_errs(vjp_all(fn, q, k, v, do), want)
    scale = {name: jnp.max(jnp.abs(w)) for name, w in zip(("out", "dq", "dk", "dv"), want)}
    return errs, scale

  return check


def run_grad_cases():
  q, k, v, do = random_inputs()
  variants = data_variants()
  devices = jax.devices()
  for n in (2, 4, 8):
    mesh = jax.make_mesh((n,), ("context",), axis_types=(AxisType.Auto,),
                         devices=devices[:n])
    for pname, pattern in PATTERNS.items():
      check = make_check(mesh, n, pattern)
      for layout in layouts.LAYOUTS:
        perm = layouts.context_parallel_permutation(T, n, layout)
        perm_j, inv_j = jnp.asarray(perm, jnp.int32), jnp.asarray(np.argsort(perm), jnp.int32)
        for dname, (pos, seg, slopes) in variants.items():
          errs, scale = jax.device_get(check(q, k, v, do, jnp.asarray(pos), jnp.asarray(seg),
                                             jnp.asarray(slopes), perm_j, inv_j))
          for impl, e in errs.items():
            emit(case="grad", n=n, pattern=pname, layout=layout, data=dname, impl=impl,
                 err={key: float(val) for key, val in e.items()},
                 scale={key: float(val) for key, val in scale.items()})


def run_padded_case():
  """Shards with no automatic block divisor (37 tokens, default blocks shrunk to 16): the ring
  pads each shard and the padded K/V blocks travel with the real ones; all_gather pads the
  gathered keys (blockwise). Packed documents + ALiBi, GQA, sliding window."""
  from ctxjax.attention import blockwise as bw
  saved = bw.DEFAULT_BLOCK_Q, bw.DEFAULT_BLOCK_K, bw.MIN_AUTO_BLOCK
  bw.DEFAULT_BLOCK_Q = bw.DEFAULT_BLOCK_K = 16
  bw.MIN_AUTO_BLOCK = 8
  try:
    n, t = 2, 74
    mesh = jax.make_mesh((n,), ("context",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])
    q, k, v, do = random_inputs(seed=3, t=t)
    seg = packed_segments(t)
    pos = packed_positions(seg)
    for pname, pattern in (("sliding_window", PATTERNS["sliding_window"]),):
      check = make_check(mesh, n, pattern, block=None)
      for layout in ("contiguous", "striped"):
        perm = layouts.context_parallel_permutation(t, n, layout)
        errs, scale = jax.device_get(check(
            q, k, v, do, jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(SLOPES),
            jnp.asarray(perm, jnp.int32), jnp.asarray(np.argsort(perm), jnp.int32)))
        for impl, e in errs.items():
          emit(case="padded", n=n, pattern=pname, layout=layout, impl=impl,
               err={key: float(val) for key, val in e.items()},
               scale={key: float(val) for key, val in scale.items()})
  finally:
    bw.DEFAULT_BLOCK_Q, bw.DEFAULT_BLOCK_K, bw.MIN_AUTO_BLOCK = saved


def run_bf16_case():
  """bf16 q/k/v/dO, 4 devices, zigzag, causal, packed documents + ALiBi: ring / all_gather
  (K/V travel in bf16, cast to float32 block by block) vs the float32 reference on the same
  bf16-rounded inputs; the dense reference run in bf16 gives the yardstick error."""
  n = 4
  mesh = jax.make_mesh((n,), ("context",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])
  q, k, v, do = (x.astype(jnp.bfloat16) for x in random_inputs(seed=5))
  pos, seg, slopes = data_variants()["packed_alibi"]
  perm = layouts.context_parallel_permutation(T, n, "zigzag")
  kw = dict(q_positions=jnp.asarray(pos), k_positions=jnp.asarray(pos),
            q_segment_ids=jnp.asarray(seg), k_segment_ids=jnp.asarray(seg),
            pattern=PATTERNS["causal"], alibi_slopes=jnp.asarray(slopes))

  dtypes = {}

  @jax.jit
  def check(q, k, v, do):
    f32 = lambda x: x.astype(jnp.float32)
    want = vjp_all(lambda q, k, v: reference_attention(q, k, v, **kw), f32(q), f32(k), f32(v),
                   f32(do))
    ref_bf16 = vjp_all(lambda q, k, v: reference_attention(q, k, v, **kw), q, k, v, do)
    lay = lambda x: jnp.take(x, jnp.asarray(perm), axis=1)
    unlay = lambda x: jnp.take(x, jnp.asarray(np.argsort(perm)), axis=1)
    errs = {"reference_bf16": max_errs([f32(x) for x in ref_bf16], want)}
    for impl in cp.STRATEGIES:
      def fn(q, k, v, impl=impl):
        lkw = {key: lay(val) if key.endswith(("positions", "segment_ids")) else val
               for key, val in kw.items()}
        return unlay(cp.context_parallel_attend(lay(q), lay(k), lay(v), mesh=mesh,
                                                strategy=impl, **lkw))
      got = vjp_all(fn, q, k, v, do)
      dtypes[impl] = [str(x.dtype) for x in got]
      errs[impl] = max_errs([f32(x) for x in got], want)
    return errs

  errs = check(q, k, v, do)
  errs = jax.device_get(errs)
  for impl in cp.STRATEGIES:
    emit(case="bf16", impl=impl, dtypes=dtypes[impl],
         err={key: float(val) for key, val in errs[impl].items()},
         ref_err={key: float(val) for key, val in errs["reference_bf16"].items()})


def run_memory_case():
  """Compiled per-device memory (fwd+bwd, causal, zigzag, fp32; compile only): ring on 8
  devices at 8L vs blockwise on one device at L, same block size. The key blocks in flight
  reuse the score temporaries' memory, so the ratio stays near 1 (an overlapped whole-shard
  ring: 1.25x)."""
  from ctxjax.attention import blockwise as bw
  L, h, d, block = 512, 4, 32, 64

  def peak(fn, args):
    m = jax.jit(lambda q, k, v, do: vjp_all(fn, q, k, v, do)[1:]).lower(*args).compile()
    m = m.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
            m.alias_size_in_bytes)

  ones = lambda t: [jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)] * 4
  pos, seg = jnp.arange(L, dtype=jnp.int32)[None], jnp.ones((1, L), jnp.int32)
  one = peak(lambda q, k, v: bw.blockwise_attention(
      q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
      pattern=PATTERNS["causal"], block_q=block, block_k=block), ones(L))
  n, t = 8, 8 * L
  mesh = jax.make_mesh((n,), ("context",), axis_types=(AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, P(None, "context"))
  pos8 = jax.device_put(layouts.reorder_for_context_parallel(
      np.arange(t, dtype=np.int32)[None], 1, n, "zigzag"), sharding)
  seg8 = jax.device_put(np.ones((1, t), np.int32), sharding)
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in ones(t)]
  per_device = peak(lambda q, k, v: cp.context_parallel_attend(
      q, k, v, q_positions=pos8, k_positions=pos8, q_segment_ids=seg8, k_segment_ids=seg8,
      pattern=PATTERNS["causal"], mesh=mesh, strategy="ring", block_q=block, block_k=block),
      args)
  emit(case="memory", L=L, block=block, blockwise_1dev=one, ring_8dev_at_8L=per_device,
       ratio=per_device / one)


def run_registry_case():
  """attend(impl="ring"/"all_gather") inside jit under jax.set_mesh on a 2-D explicit mesh
  (batch over "data", sequence over "context"); MHA, no ALiBi, automatic block sizes,
  zigzag layout applied in numpy at 'data load'."""
  n = 4
  mesh = jax.make_mesh((2, n), ("data", "context"),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  t = 64
  q, k, v, do = random_inputs(seed=1, h=4, kv=4, t=t)
  seg = np.ones((B, t), np.int32)
  seg[0, 29:] = 2  # two documents in row 0, the boundary inside a shard
  pos = packed_positions(seg)
  r = lambda x: layouts.reorder_for_context_parallel(np.asarray(x), 1, n, "zigzag")
  u = lambda x: layouts.restore_from_context_parallel(np.asarray(x), 1, n, "zigzag")
  pattern = PATTERNS["causal"]
  kw_nat = dict(q_positions=jnp.asarray(pos), k_positions=jnp.asarray(pos),
                q_segment_ids=jnp.asarray(seg), k_segment_ids=jnp.asarray(seg), pattern=pattern)
  want = jax.jit(lambda q, k, v, do: vjp_all(
      lambda q, k, v: reference_attention(q, k, v, **kw_nat), q, k, v, do))(q, k, v, do)
  want = [np.asarray(w) for w in want]
  with jax.set_mesh(mesh):
    pos_r, seg_r = jnp.asarray(r(pos)), jnp.asarray(r(seg))
    for impl in cp.STRATEGIES:
      @jax.jit
      def run(q, k, v, do, impl=impl):
        fn = lambda q, k, v: attend(q, k, v, q_positions=pos_r, k_positions=pos_r,
                                    q_segment_ids=seg_r, k_segment_ids=seg_r, pattern=pattern,
                                    impl=impl)
        return vjp_all(fn, q, k, v, do)
      got = run(*(jnp.asarray(r(x)) for x in (q, k, v, do)))
      out_spec = str(got[0].sharding.spec)
      got = [u(np.asarray(g)) for g in got]
      err = {name: float(np.abs(g - w).max()) for name, g, w in
             zip(("out", "dq", "dk", "dv"), got, want)}
      emit(case="registry", impl=impl, n=n, mesh="data2xcontext4", err=err,
           out_spec=out_spec)


def run_s2_case():
  """LongLoRA S2-Attn (ctxjax/attention/s2.py) with attend(impl="ring"/"all_gather") under
  jax.set_mesh on a (data 2, context 4) explicit mesh, natural token order (as the trainer
  feeds it): the same as S2 on the reference kernel. Packed row 0 (a document boundary inside
  a shard), groups of 16 = a quarter of T, so the shifted half's groups cross shards."""
  from ctxjax.attention.s2 import s2_attention  # noqa: PLC0415
  n, t, group = 4, 64, 16
  mesh = jax.make_mesh((2, n), ("data", "context"),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  q, k, v, do = random_inputs(seed=2, h=4, kv=2, t=t)
  seg = np.ones((B, t), np.int32)
  seg[0, 29:] = 2
  pos, seg = jnp.asarray(packed_positions(seg)), jnp.asarray(seg)

  def s2(impl):
    return lambda q, k, v: s2_attention(q, k, v, positions=pos, segment_ids=seg,
                                        group_size=group, impl=impl)
  want = jax.jit(lambda q, k, v, do: vjp_all(s2("reference"), q, k, v, do))(q, k, v, do)
  want = [np.asarray(w) for w in want]
  with jax.set_mesh(mesh):
    for impl in cp.STRATEGIES:
      got = jax.jit(lambda q, k, v, do, impl=impl: vjp_all(s2(impl), q, k, v, do))(q, k, v, do)
      err = {name: float(np.abs(np.asarray(g) - w).max()) for name, g, w in
             zip(("out", "dq", "dk", "dv"), got, want)}
      emit(case="s2", impl=impl, n=n, err=err,
           scale={name: float(np.abs(w).max()) for name, w in zip(("dq", "dk"), want[1:3])})


def expect_error(name, fn, *needles):
  try:
    fn()
  except ValueError as err:
    msg = str(err)
    emit(case="error", name=name, ok=all(s in msg for s in needles), message=msg)
    return
  except Exception as err:  # noqa: BLE001 - report the wrong exception type
    emit(case="error", name=name, ok=False, message=f"{type(err).__name__}: {err}")
    return
  emit(case="error", name=name, ok=False, message="no error raised")


def run_error_cases():
  mesh = jax.make_mesh((4,), ("context",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:4])
  pattern = PATTERNS["causal"]

  def call(t, **kw):
    q, k, v, _ = random_inputs(t=t)
    pos = jnp.asarray(np.broadcast_to(np.arange(t, dtype=np.int32), (B, t)))
    seg = jnp.ones((B, t), jnp.int32)
    return cp.context_parallel_attend(q, k, v, q_positions=pos, k_positions=pos,
                                      q_segment_ids=seg, k_segment_ids=seg, pattern=pattern,
                                      **kw)

  expect_error("length_not_divisible", lambda: call(90, mesh=mesh), "90", "4", "context")
  expect_error("axis_not_in_mesh", lambda: call(64, mesh=mesh, axis_name="seq"), "seq",
               "context")
  expect_error("spec_without_axis", lambda: call(64, mesh=mesh, spec=P(None, None)), "context")

  def unbound_axis():
    q, k, v, _ = random_inputs(t=64)
    pos = jnp.asarray(np.broadcast_to(np.arange(64, dtype=np.int32), (B, 64)))
    seg = jnp.ones((B, 64), jnp.int32)

    def local(q, k, v, pos, seg):
      return ring.ring_attention(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                                 k_segment_ids=seg, pattern=pattern, axis_name="seq")
    spec, row = P(None, "context"), P(None, "context")
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, row, row),
                         out_specs=spec, check_vma=False)(q, k, v, pos, seg)

  expect_error("ring_axis_unbound", unbound_axis, "seq", "context")
  with jax.set_mesh(jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))):
    expect_error("registry_mesh_without_context", lambda: jax.jit(
        lambda: call(64, strategy="ring"))(), "context", "data")


def run_hlo_case():
  """Ring moves K/V with collective-permutes only (never gathers the sequence); all_gather
  gathers. Checked on the lowered (StableHLO) fwd+bwd program, no compilation needed."""
  n = 4
  mesh = jax.make_mesh((n,), ("context",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])
  q, k, v, do = random_inputs(t=64)
  pos = jnp.asarray(np.broadcast_to(np.arange(64, dtype=np.int32), (B, 64)))
  seg = jnp.ones((B, 64), jnp.int32)
  for impl in cp.STRATEGIES:
    fn = lambda q, k, v, impl=impl: cp.context_parallel_attend(
        q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
        pattern=PATTERNS["causal"], mesh=mesh, strategy=impl)
    text = jax.jit(lambda q, k, v, do: vjp_all(fn, q, k, v, do)).lower(q, k, v, do).as_text()
    emit(case="hlo", impl=impl, collective_permute=text.count("collective_permute"),
         all_gather=text.count("all_gather"), reduce_scatter=text.count("reduce_scatter"))


CASES = {"errors": run_error_cases, "hlo": run_hlo_case, "registry": run_registry_case,
         "s2": run_s2_case,
         "padded": run_padded_case, "bf16": run_bf16_case, "memory": run_memory_case,
         "grad": run_grad_cases}


def main():
  t0 = time.time()
  for name in sys.argv[1:] or list(CASES):  # e.g. `python tests/ring_worker.py bf16 memory`
    CASES[name]()
  emit(case="done", seconds=time.time() - t0, devices=len(jax.devices()))


if __name__ == "__main__":
  main()
