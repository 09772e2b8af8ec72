"""One GPU: blockwise vs cuDNN attention and a ~1.1B LLaMA's train step at 8K, in one run.

  python benchmarks/gpu.py                 # the GPU figures of benchmarks/README.md
  python benchmarks/gpu.py --quick         # small shapes: checks the script on any backend

On a GPU machine whose Python has jax with CUDA, flax and optax (nothing else of ctxjax's
dependencies is imported), in one go: `export PYTHONUNBUFFERED=1; python benchmarks/gpu.py
--quick --out=/tmp/gpu_quick.json && python benchmarks/gpu.py` (the quick pass takes seconds and
stops early if that jax breaks the script; the full run is not yet timed on a GPU: ten attention
cases and two compiles of the model; rows are written as they finish).

1. Attention, forward + backward, bf16, batch 1, 32 query heads / 4 kv heads of 64 (the model's
   below), causal, T = 2K..32K: ctxjax's blockwise kernel against
   jax.nn.dot_product_attention(implementation="cudnn") (ctxjax's `cudnn` kernel: the same call
   with ctxjax's explicit mask, so it is exact for any positions). TFLOP/s by FlashAttention's
   convention (Dao 2023): forward 4 * B * H * T^2 * D / 2 causal, backward 2.5x forward. Where
   T <= --check_max_len, each kernel's output and q/k/v gradients are compared with the dense
   reference computed in float32 from the same bf16 inputs: max |error| must stay within
   3e-2 * max(1, max |reference|) (bf16's tolerance in tests/test_fused_attention.py).
2. Train step of a TinyLlama-shaped model (Zhang et al. 2024: d 2048, 22 layers, 32 heads / 4 kv
   heads of 64, MLP 5632, vocab 32000; 1.10B parameters) at T = 8192, batch 1, bf16 compute with
   float32 parameters and AdamW (ctxjax's `dtype="auto"` on GPU): tokens/s (median step after
   warm-up) and MFU = model FLOPs (PaLM's convention, ctxjax/model/flops.py) / the GPU's dense
   bf16 peak from its datasheet (BF16_PEAK below; no MFU for a GPU not listed there).
Results are written after every row (a run cut short keeps what finished) to
benchmarks/results/gpu.json, with the device's name, the date and the jax version.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import measure  # noqa: E402

from ctxjax.attention import attend, fused, make_pattern  # noqa: E402
from ctxjax.model import Transformer, model_config_from_dict  # noqa: E402
from ctxjax.model.flops import param_count, train_flops_per_token  # noqa: E402
from ctxjax.train.step import init_state, make_train_step  # noqa: E402

# Dense bf16 tensor-core peak FLOP/s by device name (NVIDIA datasheets, without sparsity).
BF16_PEAK = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, scan_layers=True)
QUICK_MODEL = dict(TINYLLAMA, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512)
TOLERANCE = 3e-2


def bf16_peak(device_kind: str) -> float | None:
  for name, peak in BF16_PEAK:
    if name in device_kind:
      return peak
  return None


def median_seconds(fn, min_runs: int = 3, budget_s: float = 10.0) -> float:
  """Median wall time of fn() (which blocks) over up to 20 runs within ~budget_s, after two."""
  fn()
  fn()
  times = []
  while len(times) < min_runs or (len(times) < 20 and sum(times) < budget_s):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def attention_flops(batch, heads, seq_len, head_dim) -> float:
  forward = 4 * batch * heads * seq_len ** 2 * head_dim / 2  # causal half
  return 3.5 * forward


def attention_rows(lengths, heads, kv_heads, head_dim, check_max_len, dtype):
  pattern = make_pattern("causal")
  for seq_len in lengths:
    keys = jax.random.split(jax.random.PRNGKey(seq_len), 4)
    q = jax.random.normal(keys[0], (1, seq_len, heads, head_dim), dtype)
    k, v = (jax.random.normal(kk, (1, seq_len, kv_heads, head_dim), dtype) for kk in keys[1:3])
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    pos = jnp.arange(seq_len, dtype=jnp.int32)[None]
    seg = jnp.ones((1, seq_len), jnp.int32)
    kw = dict(q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
              pattern=pattern)

    def fwd_bwd(impl):
      def run(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, impl=impl, **kw), q, k, v)
        return (out, *vjp(d_out))
      return jax.jit(run)

    want = None
    if seq_len <= check_max_len:
      f32 = lambda x: x.astype(jnp.float32)
      want = jax.block_until_ready(fwd_bwd("reference")(f32(q), f32(k), f32(v), f32(d_out)))
    for impl in ("blockwise", "cudnn"):
      row = {"seq_len": seq_len, "impl": impl, "dtype": jnp.dtype(dtype).name, "heads": heads,
             "kv_heads": kv_heads, "head_dim": head_dim}
      reason = (fused.cudnn_unsupported(q, k, pattern=pattern) if impl == "cudnn" else None)
      if reason:
        yield {**row, "skipped": reason}
        continue
      fn = fwd_bwd(impl)
      try:
        got = jax.block_until_ready(fn(q, k, v, d_out))
        seconds = median_seconds(lambda: jax.block_until_ready(fn(q, k, v, d_out)))
      except Exception as e:  # noqa: BLE001  (an out-of-memory or compile failure is a row)
        yield {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        continue
      row.update(fwd_bwd_ms=seconds * 1e3,
                 tflops=attention_flops(1, heads, seq_len, head_dim) / seconds / 1e12)
      if want is not None:
        errors = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) for g, w in zip(got, want)]
        scales = [max(1.0, float(jnp.max(jnp.abs(w)))) for w in want]
        row["max_abs_error"] = dict(zip(("out", "dq", "dk", "dv"), errors))
        row["matches_reference"] = all(e <= TOLERANCE * s for e, s in zip(errors, scales))
      yield row


def model_rows(model_dict, seq_len, impls, steps):
  for impl in impls:
    cfg = model_config_from_dict(dict(model_dict, attention_impl=impl))
    model = Transformer(cfg)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.1))
    row = {"seq_len": seq_len, "impl": impl, "batch": 1, "params": param_count(cfg)["total"],
           "compute_dtype": jnp.dtype(cfg.compute_dtype).name, "param_dtype": cfg.param_dtype}
    try:
      state, _ = init_state(model, tx, jax.random.PRNGKey(0), 1, seq_len)
      step = make_train_step(model, tx, {})
      # throughput.random_batch's batch; not imported: throughput reads configs/ (ml_collections,
      # which the GPU machine's python lacks).
      tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (1, seq_len + 1), 0,
                                             cfg.vocab_size, jnp.int32))
      batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
               "positions": np.arange(seq_len, dtype=np.int32)[None],
               "segment_ids": np.ones((1, seq_len), np.int32),
               "loss_mask": np.ones((1, seq_len), np.float32)}
      state, metrics, times, row["compile_and_first_step_s"] = measure.time_train_steps(
          step, state, batch, steps)
    except Exception as e:  # noqa: BLE001
      yield {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
      continue
    seconds = float(np.median(times[1:] if len(times) > 2 else times))
    row.update(step_s=seconds, tokens_per_sec=seq_len / seconds,
               flops_per_token=train_flops_per_token(cfg, seq_len),
               loss_after=float(metrics["loss"]))
    del state
    yield row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="2048,4096,8192,16384,32768")
  parser.add_argument("--check_max_len", type=int, default=4096,
                      help="compare with the float32 reference up to this length")
  parser.add_argument("--model_seq_len", type=int, default=8192)
  parser.add_argument("--model_impls", default="auto,blockwise")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--quick", action="store_true",
                      help="small shapes (T 256/512, a 2-layer model): checks the script")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "gpu.json"))
  args = parser.parse_args()
  device = jax.devices()[0]
  peak = bf16_peak(device.device_kind)
  result = {"started": measure.now(), "machine": measure.machine(), "jax": jax.__version__,
            "backend": jax.default_backend(), "device": device.device_kind,
            "bf16_peak_flops": peak, "attention": [], "model": []}
  print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"bf16 peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s", flush=True)
  lengths = [256, 512] if args.quick else [int(t) for t in args.lengths.split(",")]
  heads, kv_heads, head_dim = (4, 2, 32) if args.quick else (32, 4, 64)
  for row in attention_rows(lengths, heads, kv_heads, head_dim, args.check_max_len,
                            jnp.bfloat16):
    result["attention"].append(row)
    measure.write_json(args.out, result)
    print("attention", {k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in row.items()}, flush=True)
  model_dict = QUICK_MODEL if args.quick else TINYLLAMA
  seq_len = 256 if args.quick else args.model_seq_len
  for row in model_rows(model_dict, seq_len, args.model_impls.split(","), args.steps):
    if peak and "tokens_per_sec" in row:
      row["mfu"] = row["tokens_per_sec"] * row["flops_per_token"] / peak
    result["model"].append(row)
    measure.write_json(args.out, result)
    print("model", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
          flush=True)
  result["finished"] = measure.now()
  measure.write_json(args.out, result)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
