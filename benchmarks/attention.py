"""Attention kernels on this machine: forward+backward time and peak memory vs sequence length.

  python benchmarks/attention.py                     # T = 1K..32K, batch 1, 8 heads of 64, fp32
  python benchmarks/attention.py --lengths=1024,2048 --max_seconds=30

Memory is XLA's own accounting of the compiled fwd+bwd program (arguments + outputs +
temporaries, `compiled.memory_analysis()`), so it is known even where running would not fit.
Time is the median of a few runs after warm-up, measured only where a run is estimated to take
under --max_seconds (from the previous length, assuming the kernel's complexity). Writes
benchmarks/results/attention.json; ring attention on 8 fake devices is in attention_ring.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctxjax.attention import attend, make_pattern  # noqa: E402

HEADS, HEAD_DIM = 8, 64
CASES = (  # (name, impl, pattern, time exponent in T for extrapolating the run time)
    ("reference", "reference", dict(kind="causal"), 2),
    ("xla (jax.nn.dot_product_attention)", "xla", dict(kind="causal"), 2),
    ("blockwise", "blockwise", dict(kind="causal"), 2),
    ("blockwise, window 512", "blockwise", dict(kind="sliding_window", window=512), 1),
)


def _fwd_bwd(impl, pattern, length):
  pattern = make_pattern(**pattern)
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  seg = jnp.ones((1, length), jnp.int32)

  def loss(q, k, v):
    out = attend(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                 k_segment_ids=seg, pattern=pattern, impl=impl)
    return jnp.sum(out.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(impl, pattern, length, *, run: bool, repeats: int = 3):
  spec = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.float32)
  fn = _fwd_bwd(impl, pattern, length)
  compiled = fn.lower(spec, spec, spec).compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  result = {"peak_bytes": int(peak), "seconds": None}
  if run:
    x = jax.random.normal(jax.random.PRNGKey(0), (1, length, HEADS, HEAD_DIM), jnp.float32)
    jax.block_until_ready(compiled(x, x, x))
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(compiled(x, x, x))
      times.append(time.perf_counter() - t)
    result["seconds"] = float(np.median(times))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
  parser.add_argument("--max_seconds", type=float, default=20.0)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "attention.json"))
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  rows = []
  for name, impl, pattern, exponent in CASES:
    last = None  # (length, seconds) of the last timed run
    for length in lengths:
      estimate = None if last is None else last[1] * (length / last[0]) ** exponent
      run = estimate is None or estimate < args.max_seconds
      r = measure(impl, pattern, length, run=run)
      if r["seconds"] is not None:
        last = (length, r["seconds"])
      rows.append({"kernel": name, "impl": impl, "pattern": pattern, "length": length, **r})
      print(json.dumps(rows[-1]), flush=True)

  by = {(r["kernel"], r["length"]): r for r in rows}
  ref, bw, xla = CASES[0][0], CASES[2][0], CASES[1][0]
  print(f"\nfwd+bwd, batch 1, {HEADS} heads x {HEAD_DIM}, fp32, {jax.default_backend()} "
        f"({os.cpu_count()} cores); memory = XLA's compiled accounting")
  header = f"{'T':>6} " + " ".join(f"{c[0][:22]:>24}" for c in CASES)
  print(header)
  for length in lengths:
    cells = []
    for c in CASES:
      r = by[(c[0], length)]
      t = f"{r['seconds']:.3f}s" if r["seconds"] is not None else "-"
      cells.append(f"{r['peak_bytes'] / 2**20:9.0f}MiB {t:>9}")
    print(f"{length:>6} " + " ".join(f"{c:>24}" for c in cells))
  for length in lengths:
    b, r, x = by[(bw, length)], by[(ref, length)], by[(xla, length)]
    line = f"T={length}: blockwise/reference memory {b['peak_bytes'] / r['peak_bytes']:.3f}"
    if b["seconds"] and x["seconds"]:
      line += f", blockwise/xla time {b['seconds'] / x['seconds']:.2f}"
    print(line)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"date": datetime.date.today().isoformat(), "backend": jax.default_backend(),
               "cpu_count": os.cpu_count(), "jax": jax.__version__, "heads": HEADS,
               "head_dim": HEAD_DIM, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
