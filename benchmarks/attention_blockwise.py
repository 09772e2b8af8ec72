"""Benchmark: blockwise attention vs the dense reference vs jax.nn.dot_product_attention (XLA).

Times forward+backward (jit of jax.vjp then the pullback: one forward and one backward per call)
at batch 1, 8 heads, head_dim 64, causal, float32, for T = 512 ... 4096 (8192 for blockwise and
XLA when the dense score matrices fit in memory). Every timing is the median of several calls
after a warm-up call (compile), with the implementations interleaved round by round so a shared
machine's load affects them alike. Also times one training step of a tiny Llama (hidden 256,
4 heads of 64, 4 layers, T 1024) with attention_impl = reference vs blockwise.

  python benchmarks/attention_blockwise.py [--lengths 512,1024,2048,4096,8192] [--rounds N]
      [--no-llama] [--out benchmarks/results/attention_blockwise.json]

Prints a table and writes JSON (per length: median/min seconds per implementation and the ratios
blockwise/xla and blockwise/reference; the default block sizes; machine load).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctxjax.attention import blockwise, make_pattern  # noqa: E402
from ctxjax.attention.reference import reference_attention  # noqa: E402

BATCH, HEADS, HEAD_DIM = 1, 8, 64
CAUSAL = make_pattern("causal")


def _mem_available_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 8 << 30


def _fwd_bwd(fn, do):
  def step(q, k, v):
    _, pull = jax.vjp(fn, q, k, v)
    return pull(do)
  return jax.jit(step)


def _impls(t, do):
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  seg = jnp.ones((BATCH, t), jnp.int32)
  kw = dict(q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
            pattern=CAUSAL)
  return {
      "reference": _fwd_bwd(lambda q, k, v: reference_attention(q, k, v, **kw), do),
      "blockwise": _fwd_bwd(lambda q, k, v: blockwise.blockwise_attention(q, k, v, **kw), do),
      "xla": _fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="xla"), do),
  }


def _time_interleaved(fns: dict, args, rounds: int) -> dict:
  """Warm up (compile) each, then `rounds` rounds timing each once -> {name: [seconds]}."""
  compile_s = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s[name] = time.perf_counter() - t0
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return times, compile_s


def bench_attention(lengths, rounds, dense_max_len):
  rows = []
  for t in lengths:
    keys = jax.random.split(jax.random.PRNGKey(t), 4)
    q, k, v, do = (jax.random.normal(key, (BATCH, t, HEADS, HEAD_DIM), jnp.float32)
                   for key in keys)
    fns = _impls(t, do)
    # Dense score tensors: B*H*T*T float32. XLA keeps ~4 of them live in fwd+bwd, the reference
    # (logits, mask, probs, ...) ~6. Skip what would not fit in half the free memory.
    scores = BATCH * HEADS * t * t * 4
    budget = _mem_available_bytes() // 2
    skipped = {}
    if t > dense_max_len or 6 * scores > budget:
      skipped["reference"] = "dense [T,T] tensors too large for this benchmark"
    if 4 * scores > budget:
      skipped["xla"] = "dense [T,T] tensors do not fit in memory"
    for name in skipped:
      fns.pop(name)
    n = rounds if t <= 2048 else max(3, rounds // 2)
    times, compile_s = _time_interleaved(fns, (q, k, v), n)
    bq, _ = blockwise.choose_block(t, None, blockwise.DEFAULT_BLOCK_Q, "block_q")
    bk, _ = blockwise.choose_block(t, None, blockwise.DEFAULT_BLOCK_K, "block_k")
    visits = blockwise.count_visits(jnp.arange(t)[None], jnp.arange(t)[None],
                                    jnp.ones((1, t), jnp.int32), jnp.ones((1, t), jnp.int32),
                                    pattern=CAUSAL, block_q=bq, block_k=bk)
    row = {"T": t, "rounds": n, "block_q": bq, "block_k": bk,
           "visited_block_pairs": visits, "total_block_pairs": (t // bq) * (t // bk),
           "median_s": {m: float(np.median(ts)) for m, ts in times.items()},
           "min_s": {m: float(np.min(ts)) for m, ts in times.items()},
           "compile_plus_first_call_s": compile_s, "skipped": skipped}
    med = row["median_s"]
    row["ratio_blockwise_over_xla"] = med["blockwise"] / med["xla"] if "xla" in med else None
    row["ratio_blockwise_over_reference"] = (med["blockwise"] / med["reference"]
                                             if "reference" in med else None)
    rows.append(row)
    _print_row(row)
  return rows


def _fmt(x, unit=1e3, spec="{:9.1f}"):
  return "        -" if x is None else spec.format(x * unit)


def _print_header():
  print(f"{'T':>6} {'blocks':>8} {'pairs':>9} | {'reference ms':>12} {'blockwise ms':>12} "
        f"{'xla ms':>9} | {'bw/xla':>6} {'bw/ref':>6}", flush=True)


def _print_row(r):
  med = r["median_s"]
  ratio = lambda x: "     -" if x is None else f"{x:6.2f}"
  print(f"{r['T']:>6} {r['block_q']:>4}x{r['block_k']:<3} "
        f"{r['visited_block_pairs']:>4}/{r['total_block_pairs']:<4} | "
        f"{_fmt(med.get('reference')):>12} {_fmt(med.get('blockwise')):>12} "
        f"{_fmt(med.get('xla')):>9} | {ratio(r['ratio_blockwise_over_xla'])} "
        f"{ratio(r['ratio_blockwise_over_reference'])}", flush=True)


def bench_tiny_llama(rounds, length=1024, batch=2):
  """One optimizer step (loss, grads, Adam update) of a tiny Llama, reference vs blockwise."""
  import optax

  from ctxjax.model.config import ModelConfig
  from ctxjax.model.transformer import Transformer

  tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, length + 1), 0, 1024)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  opt = optax.adam(1e-3)
  fns, states = {}, {}
  for impl in ("reference", "blockwise"):
    cfg = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=704,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      head_dim=64, max_position_embeddings=length, attention_impl=impl)
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(1), inputs)["params"]

    def train_step(params, opt_state, model=model):
      def loss_fn(p):
        logits = model.apply({"params": p}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    fns[impl] = jax.jit(train_step)
    states[impl] = (params, opt.init(params))
  losses = {impl: float(fns[impl](*states[impl])[2]) for impl in fns}
  times, compile_s = _time_interleaved(
      {impl: (lambda impl=impl: fns[impl](*states[impl])) for impl in fns}, (), rounds)
  med = {impl: float(np.median(ts)) for impl, ts in times.items()}
  row = {"config": {"hidden_size": 256, "heads": 4, "head_dim": 64, "layers": 4,
                    "seq_len": length, "batch": batch, "optimizer": "adam"},
         "median_step_s": med, "min_step_s": {i: float(np.min(t)) for i, t in times.items()},
         "first_loss": losses,
         "speedup_blockwise_vs_reference": med["reference"] / med["blockwise"]}
  print(f"\ntiny Llama train step (T={length}, batch {batch}): reference "
        f"{med['reference'] * 1e3:.1f} ms, blockwise {med['blockwise'] * 1e3:.1f} ms -> "
        f"{row['speedup_blockwise_vs_reference']:.2f}x faster (first-step loss "
        f"{losses['reference']:.5f} vs {losses['blockwise']:.5f})", flush=True)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--dense-max-len", type=int, default=4096,
                      help="longest T at which the dense reference is timed")
  parser.add_argument("--no-llama", action="store_true")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "attention_blockwise.json"))
  args = parser.parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",") if x]
  load_before = os.getloadavg()
  print(f"fwd+bwd, batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, causal, float32; "
        f"median of interleaved rounds; {jax.devices()[0].platform}, {os.cpu_count()} cpus, "
        f"load {load_before[0]:.1f}", flush=True)
  _print_header()
  rows = bench_attention(lengths, args.rounds, args.dense_max_len)
  llama = None if args.no_llama else bench_tiny_llama(args.rounds)
  result = {"benchmark": "attention_blockwise", "jax": jax.__version__,
            "platform": jax.devices()[0].platform, "machine": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "shape": {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
                      "pattern": "causal"},
            "default_blocks": [blockwise.DEFAULT_BLOCK_Q, blockwise.DEFAULT_BLOCK_K],
            "attention_fwd_bwd": rows, "tiny_llama_train_step": llama}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
