"""Which XLA:CPU compile options train (and score) configs/tiny.py fastest on THIS CPU.

  python benchmarks/xla_options.py [--seq_lens=256,1024] [--rounds=7]
                                   [--variants=ctxjax,xla_defaults,...]
  python benchmarks/xla_options.py --program=nll --seq_lens=1024,4096,16384 --rounds=5 \
      --variants=ctxjax,xla_defaults

`--program=nll` times perplexity scoring's jitted NLL (ctxjax.eval.perplexity: the forward
pass and the masked log-softmax; random weights, 4096 tokens per call or one row of T) instead
of the train step.

ctxjax compiles its CPU programs with ctxjax/xla_options.py's CPU_OPTIONS
(YNNPACK dot fusions off), an A/B measured on the CPUs benchmarks/README.md names; XLA:CPU's
dot libraries rank differently by CPU model, so this script re-decides it on yours. The train
step is compiled once per variant, in one process, and the variants are timed in interleaved
rounds of 3 steps (median over all rounds): every variant meets the same machine load, which
separate processes one after the other do not (this 2-core machine kind moves 10-20% between
back-to-back runs). `ctxjax_control` repeats ctxjax's options last in every round: a variant
that differs from `ctxjax` by no more than the control does is within this comparison's noise.
Each variant starts from the same state and batch and runs the same number of steps, so the
losses printed at the end agree to float32 rounding (a variant that routes dots through
another library, as XLA's defaults do, differs in the 4th-5th digit after ~30 steps).
The process runs with the huge-page setting that launch/local.sh gives training
(ctxjax/host_memory.py; re-executed with it if it is missing).
Writes benchmarks/results/xla_options.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ctxjax import host_memory  # noqa: E402

if __name__ == "__main__" and not host_memory.active() and os.environ.get(
    host_memory.OPT_OUT, "") != "1":  # glibc reads the tunable only at start-up
  os.execve(sys.executable, [sys.executable, *sys.argv], host_memory.cpu_environment())

import jax  # noqa: E402

import measure  # noqa: E402
import throughput  # noqa: E402
from configs import tiny  # noqa: E402
from ctxjax.eval import perplexity  # noqa: E402
from ctxjax.model import Transformer, model_config_from_dict  # noqa: E402
from ctxjax.train.optim import make_optimizer  # noqa: E402
from ctxjax.train.step import init_state, make_train_step  # noqa: E402
from ctxjax.xla_options import CPU_OPTIONS  # noqa: E402

# name -> compile options (None: XLA's defaults). Extra options go on top of ctxjax's.
VARIANTS = {
    "ctxjax": dict(CPU_OPTIONS),
    "xla_defaults": None,
    "concurrency_scheduler_on": {**CPU_OPTIONS,
                                 "xla_cpu_enable_concurrency_optimized_scheduler": True},
    "concurrency_scheduler_off": {**CPU_OPTIONS,
                                  "xla_cpu_enable_concurrency_optimized_scheduler": False},
    "legacy_fusion_emitters": {**CPU_OPTIONS, "xla_cpu_use_fusion_emitters": False},
    "copy_insertion_region_analysis": {**CPU_OPTIONS,
                                       "xla_cpu_copy_insertion_use_region_analysis": True},
    # ctxjax's options again, timed last in every round: how much a variant's place in the
    # round alone moves its time (the noise floor of this comparison).
    "ctxjax_control": dict(CPU_OPTIONS),
}


def step_runner(seq_len: int, options):
  """A function running one train step of configs/tiny.py compiled with `options` (2048
  tokens per step, as throughput.py), on its own copy of the state."""
  config = tiny.get_config()
  config.optim.warmup_steps = 0
  cfg = model_config_from_dict(config.model)
  model = Transformer(cfg)
  tx, _ = make_optimizer(config.optim, 1000)
  batch = throughput.TOKENS_PER_STEP // seq_len
  state, _ = init_state(model, tx, jax.random.PRNGKey(0), batch, seq_len)
  step = make_train_step(model, tx, config.data, compiler_options=options)
  data = throughput.random_batch(jax.random.PRNGKey(1), batch, seq_len, cfg.vocab_size)
  box = [state]

  def run():
    box[0], metrics = step(box[0], data)
    return jax.block_until_ready(metrics)
  return run


def nll_runner(seq_len: int, options):
  """A function running perplexity scoring's NLL of configs/tiny.py's model (random weights)
  on max(1, 4096 // seq_len) rows of seq_len tokens, compiled with `options`."""
  config = tiny.get_config()
  config.model.max_position_embeddings = max(seq_len, config.model.max_position_embeddings)
  model = Transformer(model_config_from_dict(config.model))
  rows = max(1, 4096 // seq_len)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (rows, seq_len), 0,
                                         model.cfg.vocab_size), np.int32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)
  ones = np.ones(tokens.shape, np.int32)
  variables = model.init(jax.random.PRNGKey(0), tokens[:, :8], positions[:, :8], ones[:, :8])
  nll = jax.jit(lambda v, t, p, y, m, s: perplexity.masked_nll(model.apply(v, t, p, s), y, m),
                compiler_options=options)
  args = jax.device_put((variables, tokens, positions, tokens, ones.astype(np.float32), ones))

  def run():  # the arguments are on the device already: the timed call is the program alone
    return {"loss": jax.block_until_ready(nll(*args)).sum()}
  return run


RUNNERS = {"train": step_runner, "nll": nll_runner}


def compare(seq_len: int, names: list[str], rounds: int, program: str = "train") -> list[dict]:
  runners = {}
  for name in names:
    start = time.perf_counter()
    runners[name] = RUNNERS[program](seq_len, VARIANTS[name])
    runners[name]()  # compile
    print(f"T={seq_len} {name}: compiled and ran one step in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
  for run in runners.values():
    run()
  times = {name: [] for name in names}
  for _ in range(rounds):
    for name, run in runners.items():
      for _ in range(3):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
  base = float(np.median(times[names[0]]))
  rows = []
  for name in names:
    loss = float(runners[name]()["loss"])  # every variant has now run the same steps
    median = float(np.median(times[name]))
    rows.append({"program": program, "seq_len": seq_len, "variant": name,
                 "options": VARIANTS[name],
                 "step_s": median, "vs_first": median / base, "loss_after": loss,
                 "step_s_min_max": [float(np.min(times[name])), float(np.max(times[name]))]})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="256,1024")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--program", default="train", choices=sorted(RUNNERS),
                      help="train: the train step; nll: perplexity scoring's forward + NLL")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated, the first is the baseline; of {', '.join(VARIANTS)}")
  parser.add_argument("--out", default=None,
                      help="default: benchmarks/results/xla_options[_nll].json")
  args = parser.parse_args()
  args.out = args.out or os.path.join(os.path.dirname(__file__), "results", "xla_options" + (
      "" if args.program == "train" else "_" + args.program) + ".json")
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(VARIANTS)}")
  result = {"started": measure.now(), "machine": measure.machine(), "jax": jax.__version__,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "rounds": args.rounds,
            "rows": []}
  for seq_len in [int(s) for s in args.seq_lens.split(",")]:
    result["rows"] += compare(seq_len, names, args.rounds, args.program)
    result["machine_after"] = measure.machine()
    measure.write_json(args.out, result)
  print(f"\n{'T':>6} {'variant':>32} {'step ms':>8} {'vs ' + names[0]:>12} {'loss after':>11}")
  for r in result["rows"]:
    print(f"{r['seq_len']:>6} {r['variant']:>32} {r['step_s'] * 1e3:8.1f} {r['vs_first']:12.3f} "
          f"{r['loss_after']:11.6f}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
