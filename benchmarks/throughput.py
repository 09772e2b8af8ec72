"""Training throughput of configs/tiny.py on this machine, against a matmul peak and (optionally)
Hugging Face's LlamaForCausalLM (PyTorch) trained on the same shapes, all in the same run.

  python benchmarks/throughput.py                      # T=256 and T=1024, the default kernel (auto)
  python benchmarks/throughput.py --impls=auto,reference,blockwise   # every CPU kernel
  python benchmarks/throughput.py --seq_lens=256 --impls=reference --no_hf
  python benchmarks/throughput.py --impls=auto --repeats=3   # 3 fresh processes, median ratio

Writes benchmarks/results/throughput.json and prints a table. Medians over timed steps after
warm-up; the machine is shared and noisy, so compare ratios within one run. Within a run HF's
steps are timed first and ctxjax's after (never interleaved: each library's worker threads spin
after their work and slow the other's next call, benchmarks/profile_step.py). --repeats=N runs
the whole comparison in N fresh processes one after the other and reports each row's median
tokens/s and the median of the per-run ratios. HF is timed in the calling process, ctxjax in a
child with the environment launch/local.sh gives training (GLIBC_TUNABLES=glibc.malloc.hugetlb=1,
ctxjax/host_memory.py; CTXJAX_MALLOC_DEFAULTS=1 leaves it out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import measure  # noqa: E402  (benchmarks/measure.py)
from configs import tiny  # noqa: E402
from ctxjax import host_memory  # noqa: E402
from ctxjax.model import Transformer, model_config_from_dict  # noqa: E402
from ctxjax.model.flops import param_count, train_flops_per_token  # noqa: E402
from ctxjax.train.optim import make_optimizer  # noqa: E402
from ctxjax.train.step import init_state, make_train_step  # noqa: E402

TOKENS_PER_STEP = 2048  # batch * seq_len kept constant across lengths, as configs/tiny.py


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """Median fp32 FLOP/s of an n x n matmul: the machine's practical peak for this run."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(times))


def random_batch(rng, batch, seq_len, vocab):
  tokens = np.asarray(jax.random.randint(rng, (batch, seq_len + 1), 0, vocab, jnp.int32))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "loss_mask": np.ones((batch, seq_len), np.float32)}


def ctxjax_tokens_per_sec(seq_len: int, impl: str, steps: int, overrides: dict) -> dict:
  config = tiny.get_config()
  config.model.attention_impl = impl
  for k, v in overrides.items():
    config.model[k] = v
  cfg = model_config_from_dict(config.model)
  batch = TOKENS_PER_STEP // seq_len
  model = Transformer(cfg)
  config.optim.warmup_steps = 0
  tx, _ = make_optimizer(config.optim, steps + 2)
  state, _ = init_state(model, tx, jax.random.PRNGKey(0), batch, seq_len)
  step = make_train_step(model, tx, config.data)
  data = random_batch(jax.random.PRNGKey(1), batch, seq_len, cfg.vocab_size)
  _, _, times, _ = measure.time_train_steps(step, state, data, steps)
  tps = TOKENS_PER_STEP / float(np.median(times))
  return {"tokens_per_sec": tps, "flops_per_token": train_flops_per_token(cfg, seq_len),
          "params": param_count(cfg)["total"]}


def hf_llama(seq_len: int):
  """configs/tiny.py's model as transformers' LlamaForCausalLM (sdpa attention, fp32)."""
  import transformers
  m = tiny.get_config().model
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
      num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim,
      max_position_embeddings=max(m.max_position_embeddings, seq_len), rms_norm_eps=m.rms_norm_eps,
      tie_word_embeddings=False, attn_implementation="sdpa"))


def hf_tokens_per_sec(seq_len: int, steps: int) -> float | None:
  """The same model in transformers (sdpa attention, fp32, AdamW), on the same shapes."""
  try:
    import torch
    import transformers  # noqa: F401
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  m = tiny.get_config().model
  model = hf_llama(seq_len)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  batch = TOKENS_PER_STEP // seq_len
  tokens = torch.randint(0, m.vocab_size, (batch, seq_len))

  def one():
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  one()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    one()
    times.append(time.perf_counter() - t)
  return TOKENS_PER_STEP / float(np.median(times))


def measure_ctxjax(args) -> dict:
  """ctxjax's rows in this process (and the matmul peak); HF's columns are filled by main."""
  from ctxjax import attention
  impls = [i for i in args.impls.split(",") if i in attention.IMPLEMENTATIONS]
  peak = matmul_peak_flops()
  rows = []
  for seq_len in [int(s) for s in args.seq_lens.split(",")]:
    for impl in impls:
      r = ctxjax_tokens_per_sec(seq_len, impl, args.steps, {})
      flops = r["tokens_per_sec"] * r["flops_per_token"]
      rows.append({"seq_len": seq_len, "impl": impl, "tokens_per_sec": r["tokens_per_sec"],
                   "model_flops_per_sec": flops, "fraction_of_matmul_peak": flops / peak,
                   "params": r["params"]})
      print(json.dumps(rows[-1]), flush=True)
  return {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
          platform.machine(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "matmul_peak_flops": peak,
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
          "tokens_per_step": TOKENS_PER_STEP, "rows": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="256,1024")
  parser.add_argument("--impls", default="auto",
                      help="comma-separated model.attention_impl values; auto = what users get")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--no_hf", action="store_true")
  parser.add_argument("--repeats", type=int, default=1,
                      help="run the comparison in this many fresh processes; report medians")
  parser.add_argument("--ctxjax_only", action="store_true",
                      help="(internal) ctxjax's side, in the child process")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "throughput.json"))
  args = parser.parse_args()
  if args.repeats > 1:
    return _repeat(args)
  if args.ctxjax_only:
    result = measure_ctxjax(args)
  else:
    # HF here, in the caller's environment; ctxjax in a child process with the environment
    # launch/local.sh gives it (huge pages for glibc's large blocks, ctxjax/host_memory.py),
    # which glibc reads only at start-up. Never interleaved (the other library's spinning
    # threads slow the next call, benchmarks/profile_step.py).
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    hf = {} if args.no_hf else {t: hf_tokens_per_sec(t, args.steps) for t in seq_lens}
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "ctxjax.json")
      subprocess.run([sys.executable, os.path.abspath(__file__), "--ctxjax_only",
                      f"--seq_lens={args.seq_lens}", f"--impls={args.impls}",
                      f"--steps={args.steps}", f"--out={out}"], check=True,
                     env=host_memory.cpu_environment())
      with open(out, encoding="utf-8") as f:
        result = json.load(f)
    result["hf_glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    for r in result["rows"]:
      hf_tps = r["hf_torch_tokens_per_sec"] = hf.get(r["seq_len"])
      r["vs_hf"] = r["tokens_per_sec"] / hf_tps if hf_tps else None
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  if args.ctxjax_only:
    return
  peak, rows = result["matmul_peak_flops"], result["rows"]
  print(f"\nmatmul peak {peak / 1e9:.1f} GFLOP/s ({result['backend']}, {os.cpu_count()} cores; "
        f"ctxjax with GLIBC_TUNABLES={result['glibc_tunables'] or '(unset)'})")
  print(f"{'T':>6} {'impl':>10} {'tok/s':>9} {'GFLOP/s':>8} {'of peak':>8} {'HF tok/s':>9} "
        f"{'vs HF':>6}")
  for r in rows:
    hf = f"{r['hf_torch_tokens_per_sec']:9.0f}" if r["hf_torch_tokens_per_sec"] else f"{'-':>9}"
    ratio = f"{r['vs_hf']:6.2f}" if r["vs_hf"] else f"{'-':>6}"
    print(f"{r['seq_len']:>6} {r['impl']:>10} {r['tokens_per_sec']:9.0f} "
          f"{r['model_flops_per_sec'] / 1e9:8.1f} {r['fraction_of_matmul_peak']:8.1%} {hf} {ratio}")


def _repeat(args):
  """The comparison in `args.repeats` fresh processes, one after the other; medians."""
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.repeats):
      out = os.path.join(tmp, f"run{i}.json")
      cmd = [sys.executable, os.path.abspath(__file__), f"--seq_lens={args.seq_lens}",
             f"--impls={args.impls}", f"--steps={args.steps}", f"--out={out}"]
      subprocess.run(cmd + (["--no_hf"] if args.no_hf else []), check=True)
      with open(out, encoding="utf-8") as f:
        runs.append(json.load(f))
  rows = []
  for j, first in enumerate(runs[0]["rows"]):
    per_run = [run["rows"][j] for run in runs]
    median = lambda key: (float(np.median([r[key] for r in per_run]))
                          if per_run[0][key] is not None else None)
    rows.append({**first, "tokens_per_sec": median("tokens_per_sec"),
                 "hf_torch_tokens_per_sec": median("hf_torch_tokens_per_sec"),
                 "vs_hf": median("vs_hf"), "per_run": per_run})
  result = {**runs[0], "repeats": args.repeats, "rows": rows,
            "matmul_peak_flops_per_run": [run["matmul_peak_flops"] for run in runs]}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"\nmedians over {args.repeats} processes:")
  print(f"{'T':>6} {'impl':>10} {'tok/s':>9} {'HF tok/s':>9} {'vs HF':>6}  per run")
  for r in rows:
    hf = f"{r['hf_torch_tokens_per_sec']:9.0f}" if r["hf_torch_tokens_per_sec"] else f"{'-':>9}"
    ratio = f"{r['vs_hf']:6.2f}" if r["vs_hf"] else f"{'-':>6}"
    each = " ".join(f"{x['vs_hf']:.2f}" if x["vs_hf"] else f"{x['tokens_per_sec']:.0f}"
                    for x in r["per_run"])
    print(f"{r['seq_len']:>6} {r['impl']:>10} {r['tokens_per_sec']:9.0f} {hf} {ratio}  {each}")


if __name__ == "__main__":
  main()
