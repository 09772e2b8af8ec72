"""Benchmark: ring vs all_gather context-parallel attention vs dense XLA on 8 fake CPU devices.

Causal forward+backward (jit of jax.vjp then the pullback), batch 1, 8 heads, head_dim 64,
float32, T = 4096, 8192 (16384 by default too; dense XLA only where its [T, T] scores fit).
  * ring / all_gather: 8 fake CPU devices (--xla_force_host_platform_device_count=8), sequence
    sharded over "context", inputs already in the layout (zigzag by default; contiguous too at
    T <= --contiguous-max-len to show the load-balancing effect), placed on the mesh before
    timing;
  * dense: jax.nn.dot_product_attention(implementation="xla", is_causal=True) on ONE device.
Time = median of interleaved rounds after a warm-up (compile) call. Memory = XLA's compiled
memory_analysis() of the SPMD program, i.e. PER DEVICE: arguments + outputs + temporaries -
aliased (the planned peak of live buffers; the host's RSS cannot be split per fake device).

The memory point: ring on n = 8 devices at T = 8L against blockwise on ONE device at L, at the
same block size (default 256, and 128 / 64), and the longest T the ring fits within exactly
blockwise's memory at L. Each key block is handed on once it has been used, when the score
temporaries are dead, so the copies in flight reuse their memory: the ring needs blockwise's
per-device memory plus its travelling copy of the key positions / segment ids (2 int32 per
token). all_gather's grows with T (full K/V, dK/dV per device); dense grows with T^2.

Baseline in the same run (--ringattention DIR, or an importable `ringattention`): haoliuhl's
ringattention_jax.ring_attention (pip package ringattention 0.1.2; its module is loaded from
the file, since the package __init__ needs an older jax), same shapes, contiguous layout (its
causal mask assumes it), its chunk size --ringattention-chunk (default 256: its fastest here of
256 / 512 / 1024 at T = 8K), float32 logits.

All 8 fake devices share this machine's cores (2 here), so the wall time measures total work +
ring overheads, not an 8-way speed-up, and load balancing cannot shorten the critical path the
way it does on real accelerators.

  python benchmarks/attention_ring.py [--lengths 4096,8192,16384] [--rounds N]
      [--memory-base 2048] [--ringattention DIR] [--out benchmarks/results/attention_ring.json]
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctxjax.attention import blockwise, layouts, make_pattern  # noqa: E402
from ctxjax.attention import context_parallel as cp  # noqa: E402
from attention_blockwise import _mem_available_bytes  # noqa: E402  (same folder)

BATCH, HEADS, HEAD_DIM = 1, 8, 64
N_DEV = 8
CAUSAL = make_pattern("causal")
YARDSTICK = ("haoliuhl/ringattention, 8 fake CPU devices, causal fwd+bwd T=8K: ~4.2 s; dense "
             "XLA: ~19 s and ~11 GB (project brief; their head count/dim and machine unknown)")


def _fwd_bwd(fn):
  def step(q, k, v, do):
    _, pull = jax.vjp(fn, q, k, v)
    return pull(do)
  return jax.jit(step)


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  get = lambda name: int(getattr(m, name, 0) or 0)
  arg, out, tmp, alias = (get("argument_size_in_bytes"), get("output_size_in_bytes"),
                          get("temp_size_in_bytes"), get("alias_size_in_bytes"))
  return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": tmp, "alias_bytes": alias,
          "peak_bytes": arg + out + tmp - alias}


def _inputs(t):
  keys = jax.random.split(jax.random.PRNGKey(t), 4)
  return [jax.random.normal(key, (BATCH, t, HEADS, HEAD_DIM), jnp.float32) for key in keys]


def _cp_case(t, n, strategy, layout, block=None):
  """(jitted fwd+bwd, args placed on the mesh) for context-parallel attention on n devices."""
  mesh = jax.make_mesh((n,), ("context",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])
  spec, row = NamedSharding(mesh, P(None, "context")), NamedSharding(mesh, P(None, "context"))
  pos = layouts.reorder_for_context_parallel(np.arange(t, dtype=np.int32)[None], 1, n, layout)
  pos = jax.device_put(pos, row)
  seg = jax.device_put(np.ones((BATCH, t), np.int32), row)
  fn = _fwd_bwd(lambda q, k, v: cp.context_parallel_attend(
      q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
      pattern=CAUSAL, mesh=mesh, strategy=strategy, block_q=block, block_k=block))
  # Random data stands for tokens already permuted at load (the layout only moves tokens).
  args = [jax.device_put(x, spec) for x in _inputs(t)]
  return fn, args


def _dense_case(t):
  fn = _fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                             implementation="xla"))
  return fn, _inputs(t)


def _blockwise_case(t, block=None):
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.ones((BATCH, t), jnp.int32)
  fn = _fwd_bwd(lambda q, k, v: blockwise.blockwise_attention(
      q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
      pattern=CAUSAL, block_q=block, block_k=block))
  return fn, _inputs(t)


_HAOLIUHL = {}  # "module": haoliuhl's ringattention_jax, "chunk": its chunk size


def load_haoliuhl(path):
  """haoliuhl's ringattention_jax module (from DIR/ringattention/ringattention_jax.py, or the
  installed package's file), or None. Loaded from the file: the package __init__ imports
  jax.lib.xla_bridge, which jax 0.10 no longer has."""
  import importlib.util
  candidates = []
  if path:
    candidates.append(os.path.join(path, "ringattention", "ringattention_jax.py"))
  spec = importlib.util.find_spec("ringattention")
  if spec is not None and spec.submodule_search_locations:
    candidates += [os.path.join(d, "ringattention_jax.py")
                   for d in spec.submodule_search_locations]
  for file in candidates:
    if os.path.exists(file):
      if path:
        sys.path.insert(0, path)  # its own dependency (einops) may live there too
      spec = importlib.util.spec_from_file_location("ringattention_jax", file)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      return module
  return None


def _haoliuhl_case(t, n=N_DEV):
  """haoliuhl/ringattention on n devices, contiguous layout, causal, float32 logits."""
  module, chunk = _HAOLIUHL["module"], _HAOLIUHL["chunk"]
  mesh = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
  chunk = min(chunk, t // n)
  kwargs = dict(causal_block_size=1, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                query_chunk_size=chunk, key_chunk_size=chunk, dtype=jnp.float32,
                policy=jax.checkpoint_policies.nothing_saveable, precision=None,
                prevent_cse=True)
  local = lambda q, k, v, bias, seg: module.ring_attention(q, k, v, bias, seg, None, "sp", True,
                                                           kwargs)
  seq = P(None, "sp")
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, P(None, None, None, "sp"),
                                                      seq), out_specs=seq, check_vma=False)
  bias = jax.device_put(jnp.zeros((BATCH, 1, 1, t), jnp.float32),
                        NamedSharding(mesh, P(None, None, None, "sp")))
  seg = jax.device_put(jnp.zeros((BATCH, t), jnp.int32), NamedSharding(mesh, seq))
  fn = _fwd_bwd(lambda q, k, v: sharded(q, k, v, bias, seg))
  return fn, [jax.device_put(x, NamedSharding(mesh, seq)) for x in _inputs(t)]


def _case(name, t):
  """name: "dense_xla" | "blockwise_1dev[@block]" | "strategy:layout:n[@block]" |
  "haoliuhl:contiguous:n"."""
  name, _, block = name.partition("@")
  block = int(block) if block else None
  if name == "dense_xla":
    return _dense_case(t)
  if name == "blockwise_1dev":
    return _blockwise_case(t, block)
  strategy, layout, n = name.split(":")  # e.g. "ring:zigzag:8"
  if strategy == "haoliuhl":
    return _haoliuhl_case(t, int(n))
  return _cp_case(t, int(n), strategy, layout, block)


def _compile(fn, args):
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def ring_block_schedule(t, n, layout, block=blockwise.DEFAULT_BLOCK_Q) -> dict:
  """Causal block pairs the ring computes, from the layout alone (numpy): at step s device i
  holds the K/V of device (i - s) mod n; a (q block, k block) pair is visited iff
  min(k) <= max(q) (`Causal.block_visible`) and its shard pair is visible. `critical_path` =
  sum over steps of the busiest device's blocks: the ring's time on real parallel devices
  (steps are synchronous); `total` = all devices' blocks (the time on shared CPU cores)."""
  tok = layouts.device_tokens(t, n, layout)
  blk = min(block, tok.shape[1])
  lo = tok.reshape(n, -1, blk).min(-1)
  hi = tok.reshape(n, -1, blk).max(-1)
  per_step = np.zeros((n, n), np.int64)  # [step, device]
  for s in range(n):
    for i in range(n):
      j = (i - s) % n
      per_step[s, i] = int((lo[j][None, :] <= hi[i][:, None]).sum())
  return {"block": blk, "critical_path": int(per_step.max(1).sum()),
          "total": int(per_step.sum()), "per_step_max": per_step.max(1).tolist()}


def bench_length(t, rounds, contiguous_max_len, budget):
  names = [f"ring:zigzag:{N_DEV}", f"all_gather:zigzag:{N_DEV}"]
  if t <= contiguous_max_len:
    names.insert(1, f"ring:contiguous:{N_DEV}")
  if _HAOLIUHL:
    names.append(f"haoliuhl:contiguous:{N_DEV}")
  names.append("dense_xla")
  compiled, args, memory, compile_s, skipped = {}, {}, {}, {}, {}
  for name in names:
    fn, a = _case(name, t)
    compiled[name], compile_s[name] = _compile(fn, a)
    memory[name] = _memory(compiled[name])
    if memory[name]["peak_bytes"] > budget:
      skipped[name] = (f"planned peak {memory[name]['peak_bytes'] / 2**30:.1f} GiB > budget "
                       f"{budget / 2**30:.1f} GiB (half of MemAvailable): not run")
      compiled.pop(name)
      continue
    args[name] = a
  first = {}
  for name in compiled:  # warm-up call (buffers, thread pools)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled[name](*args[name]))
    first[name] = time.perf_counter() - t0
  times = {name: [] for name in compiled}
  for _ in range(rounds):
    for name in compiled:
      t0 = time.perf_counter()
      jax.block_until_ready(compiled[name](*args[name]))
      times[name].append(time.perf_counter() - t0)
  counts = {layout: layouts.causal_pair_counts(t, N_DEV, layout).tolist()
            for layout in ("contiguous", "zigzag")}
  row = {"T": t, "rounds": rounds, "median_s": {k: float(np.median(v)) for k, v in times.items()},
         "min_s": {k: float(np.min(v)) for k, v in times.items()}, "first_call_s": first,
         "compile_s": compile_s, "memory_per_device": memory, "skipped": skipped,
         "causal_pairs_per_device_max_over_mean": {
             k: float(max(v) / np.mean(v)) for k, v in counts.items()},
         "ring_block_schedule": {layout: ring_block_schedule(t, N_DEV, layout)
                                 for layout in layouts.LAYOUTS}}
  return row


MEMORY_BLOCKS = (None, 128, 64)  # None: the kernels' default (256)


def bench_memory_point(base, budget):
  """Per-device planned memory: one device at base vs 8 devices at 8*base, per block size."""
  cases = [("ring:contiguous:1", base), ("dense_xla", base),
           (f"all_gather:zigzag:{N_DEV}", N_DEV * base), ("dense_xla", N_DEV * base)]
  for block in MEMORY_BLOCKS:
    suffix = "" if block is None else f"@{block}"
    cases += [("blockwise_1dev" + suffix, base), (f"ring:zigzag:{N_DEV}" + suffix, N_DEV * base)]
  if _HAOLIUHL:
    cases += [(f"haoliuhl:contiguous:{N_DEV}", N_DEV * base)]
  rows = []
  for name, t in cases:
    fn, a = _case(name, t)
    compiled, _ = _compile(fn, a)
    mem = _memory(compiled)
    devices = 1 if name.split("@")[0] in ("blockwise_1dev", "dense_xla") else int(
        name.split("@")[0].split(":")[2])
    rows.append({"impl": name, "T": t, "devices": devices, **mem})
    del compiled
  return rows


def longest_at_memory(budget_bytes, hi, step, max_steps=32):
  """Largest T <= hi (hi, hi - step, ...; at most max_steps tried) whose ring (zigzag, 8 devices)
  fwd+bwd plans at most `budget_bytes` per device (compile only). A downward scan, not a
  bisection: the planned memory is not monotonic in T (each T picks its own block divisor, or
  pads the shard)."""
  planned = {}
  for t in range(hi, max(hi - max_steps * step, 0), -step):
    fn, a = _case(f"ring:zigzag:{N_DEV}", t)
    planned[t] = _memory(_compile(fn, a)[0])["peak_bytes"]
    if planned[t] <= budget_bytes:
      return t, planned
  return None, planned


def _gib(x):
  return f"{x / 2**30:8.3f}"


def _print_schedule(rows):
  print(f"\nring causal block pairs (block 256) on {N_DEV} devices: critical path (sum over "
        f"steps of the busiest device) / total over devices")
  for r in rows:
    sch = r["ring_block_schedule"]
    print(f"{r['T']:>6} " + "  ".join(f"{k}: {v['critical_path']}/{v['total']}"
                                       for k, v in sch.items()), flush=True)


def _print_table(rows):
  print(f"\n{'T':>6} {'impl':<24} {'median s':>9} {'min s':>8} {'compile s':>9} "
        f"{'peak GiB/dev':>12} {'temp GiB/dev':>12}")
  for r in rows:
    for name, mem in r["memory_per_device"].items():
      med = r["median_s"].get(name)
      mn = r["min_s"].get(name)
      print(f"{r['T']:>6} {name:<24} {('%9.2f' % med) if med is not None else '  skipped':>9} "
            f"{('%8.2f' % mn) if mn is not None else '       -':>8} {r['compile_s'][name]:9.1f} "
            f"{_gib(mem['peak_bytes']):>12} {_gib(mem['temp_bytes']):>12}", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="4096,8192,16384")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--contiguous-max-len", type=int, default=8192,
                      help="longest T at which ring with the contiguous layout is timed too")
  parser.add_argument("--memory-base", type=int, default=2048,
                      help="L of the memory point (ring 8 devices at 8L vs one device at L)")
  parser.add_argument("--ringattention", default=None,
                      help="folder holding haoliuhl's ringattention package (baseline)")
  parser.add_argument("--ringattention-chunk", type=int, default=256,
                      help="haoliuhl's query/key chunk size")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "attention_ring.json"))
  args = parser.parse_args(argv)
  assert len(jax.devices()) >= N_DEV, jax.devices()
  module = load_haoliuhl(args.ringattention)
  if module is not None:
    _HAOLIUHL.update(module=module, chunk=args.ringattention_chunk)
  print(f"baseline haoliuhl/ringattention: "
        f"{'chunk %d' % args.ringattention_chunk if module else 'not found (skipped)'}")
  lengths = [int(x) for x in args.lengths.split(",") if x]
  budget = _mem_available_bytes() // 2
  load_before = os.getloadavg()
  print(f"causal fwd+bwd, batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, float32; "
        f"{N_DEV} fake {jax.devices()[0].platform} devices on {os.cpu_count()} cpus; "
        f"load {load_before[0]:.1f}; memory = compiled memory_analysis per device", flush=True)
  t0 = time.perf_counter()
  rows = []
  for t in lengths:
    rows.append(bench_length(t, args.rounds, args.contiguous_max_len, budget))
    _print_table(rows[-1:])
  _print_schedule(rows)
  mem_rows = bench_memory_point(args.memory_base, budget)
  print(f"\nmemory point (planned per-device peak, GiB): one device at L={args.memory_base} vs "
        f"{N_DEV} devices at {N_DEV}L={N_DEV * args.memory_base}")
  for r in mem_rows:
    print(f"  {r['impl']:<24} T={r['T']:>6} devices={r['devices']}  peak {_gib(r['peak_bytes'])}"
          f"  (args {_gib(r['argument_bytes'])}, temp {_gib(r['temp_bytes'])})", flush=True)
  by = {(r["impl"], r["T"]): r for r in mem_rows}
  long_t = N_DEV * args.memory_base
  per_block = {}
  for block in MEMORY_BLOCKS:
    suffix = "" if block is None else f"@{block}"
    ring_long = by[(f"ring:zigzag:{N_DEV}" + suffix, long_t)]["peak_bytes"]
    bw_short = by[("blockwise_1dev" + suffix, args.memory_base)]["peak_bytes"]
    block_rows = block or blockwise.DEFAULT_BLOCK_K
    per_block[str(block_rows)] = {
        "ring_8dev_at_8L_bytes": ring_long, "blockwise_1dev_at_L_bytes": bw_short,
        "ratio": ring_long / bw_short, "ring_minus_blockwise_bytes": ring_long - bw_short,
        # K, V, dK, dV: one fp32 key block each
        "one_key_block_per_array_bytes": 4 * BATCH * block_rows * HEADS * HEAD_DIM * 4}
    print(f"  block {block_rows:>3}: ring 8 dev @ {long_t} / blockwise 1 dev @ "
          f"{args.memory_base} = {ring_long / bw_short:.4f}x  ({ring_long - bw_short:+d} bytes; "
          f"one K, V, dK, dV block: "
          f"{per_block[str(block_rows)]['one_key_block_per_array_bytes'] / 2**20:.1f} MiB)",
          flush=True)
  default = per_block[str(blockwise.DEFAULT_BLOCK_K)]
  one_short = by[("ring:contiguous:1", args.memory_base)]["peak_bytes"]
  longest, planned = longest_at_memory(default["blockwise_1dev_at_L_bytes"], long_t, 2 * N_DEV)
  summary = {"per_block": per_block,
             "ring_8dev_at_8L_over_blockwise_1dev_at_L": default["ratio"],
             "ring_8dev_at_8L_over_ring_1dev_at_L": default["ring_8dev_at_8L_bytes"] / one_short,
             "longest_ring_8dev_T_at_blockwise_1dev_memory": longest,
             "longest_over_L": None if longest is None else longest / args.memory_base,
             "scan_planned_peak_bytes": {str(k): v for k, v in sorted(planned.items())}}
  if longest is not None:
    print(f"  longest T for ring on {N_DEV} devices within blockwise's per-device memory at "
          f"L={args.memory_base} (default blocks, multiples of {2 * N_DEV}): {longest} = "
          f"{longest / args.memory_base:.3f} L")
  worst = max(v["ratio"] for v in per_block.values())
  print(f"ring on {N_DEV} devices at {N_DEV}x the length: {worst:.4f}x (worst block size) the "
        f"per-device memory of blockwise on one device")
  print(f"\nyardstick: {YARDSTICK}")
  result = {
      "benchmark": "attention_ring", "jax": jax.__version__, "platform": platform.machine(),
      "backend": jax.devices()[0].platform, "fake_devices": N_DEV, "cpu_count": os.cpu_count(),
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
      "shape": {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
                "pattern": "causal"},
      "memory_budget_bytes": budget, "attention_fwd_bwd": rows, "memory_point": {
          "base_length": args.memory_base, "rows": mem_rows, **summary},
      "haoliuhl_ringattention": ({"chunk": args.ringattention_chunk, "package":
                                  "ringattention 0.1.2 (pip)"} if module else None),
      "yardstick": YARDSTICK, "total_s": time.perf_counter() - t0}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
