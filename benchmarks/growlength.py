"""GrowLength (progressive 64 -> 128 -> 256 -> 512) vs fixed-length 512 training of the tiny model
with the same steps and tokens (configs/tiny_growlength.py), run back to back in one invocation.

  python benchmarks/growlength.py [--steps_per_stage=75]

Reports per run: wall time (all of it, compiles included: GrowLength compiles once per stage),
the median steady-state tokens/s of each stage, the train loss at the end of each stage and the
held-out loss at 512 tokens. Writes benchmarks/results/growlength.json.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(arg: str, workdir: str, steps_per_stage: int) -> dict:
  cmd = [sys.executable, "-m", "ctxjax.train",
         f"--config=configs/tiny_growlength.py:{arg},{steps_per_stage}",
         f"--workdir={workdir}", "--config.train.log_every=5"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  wall = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(proc.stderr[-3000:])
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r for r in records if "loss" in r]
  by_stage: dict[int, list] = {}
  for r in steps:
    by_stage.setdefault(r["stage"], []).append(r)
  stages = []
  for index, rs in sorted(by_stage.items()):
    steady = sorted(r["tokens_per_sec"] for r in rs[1:])  # the first window includes compiling
    stages.append({"stage": index, "seq_len": rs[0]["seq_len"], "batch_size": rs[0]["batch_size"],
                   "last_step": rs[-1]["step"], "loss_at_end": rs[-1]["loss"],
                   "median_tokens_per_sec": steady[len(steady) // 2] if steady else None})
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  return {"run": arg, "wall_sec": wall, "eval_loss_at_512": summary["eval_loss"],
          "unigram_entropy": summary["unigram_entropy"], "final_train_loss":
          summary["final_train_loss"], "stages": stages,
          "loss_curve": [(r["step"], r["seq_len"], r["loss"]) for r in steps]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps_per_stage", type=int, default=75)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                     "growlength.json"))
  args = parser.parse_args()
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for arg in ("growlength", "fixed"):
      results.append(run(arg, os.path.join(tmp, arg), args.steps_per_stage))
  grow, fixed = results
  out = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
         platform.machine(), "cpus": os.cpu_count(), "steps_per_stage": args.steps_per_stage,
         "tokens_per_step": 2048, "runs": results,
         "wall_ratio_growlength_over_fixed": grow["wall_sec"] / fixed["wall_sec"],
         "eval_loss_difference_growlength_minus_fixed":
             grow["eval_loss_at_512"] - fixed["eval_loss_at_512"]}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"{'run':>11} {'wall s':>7} {'eval@512':>9} {'train':>7}  stages (T x B: tok/s, loss)")
  for r in results:
    stages = "; ".join(f"{s['seq_len']}x{s['batch_size']}: {s['median_tokens_per_sec']:.0f}, "
                       f"{s['loss_at_end']:.3f}" for s in r["stages"])
    print(f"{r['run']:>11} {r['wall_sec']:7.1f} {r['eval_loss_at_512']:9.4f} "
          f"{r['final_train_loss']:7.3f}  {stages}")
  print(f"wall ratio growlength/fixed {out['wall_ratio_growlength_over_fixed']:.3f}; eval loss "
        f"difference {out['eval_loss_difference_growlength_minus_fixed']:+.4f} nats")


if __name__ == "__main__":
  main()
