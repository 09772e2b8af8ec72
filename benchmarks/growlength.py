"""GrowLength (progressive 64 -> 128 -> 256 -> 512) vs fixed-length 512 training of the tiny model
with the same steps and tokens (configs/tiny_growlength.py), over several seeds, interleaved.

  python benchmarks/growlength.py [--steps_per_stage=75] [--seeds=0,1,2]

For each seed (train.seed: parameter init and data order) both runs go back to back, in
alternating order (seed 0: growlength then fixed, seed 1: fixed then growlength, ...), so a
change in machine load falls on both arms. Reports per run: wall time (all of it, compiles
included: GrowLength compiles once per stage), the median steady-state tokens/s of each stage,
the train loss at the end of each stage and the held-out loss at 512 tokens; over seeds, the
mean and spread of the paired wall ratio and loss difference. Writes
benchmarks/results/growlength.json after every run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402  (benchmarks/measure.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(arg: str, workdir: str, steps_per_stage: int, seed: int) -> dict:
  cmd = [sys.executable, "-m", "ctxjax.train",
         f"--config=configs/tiny_growlength.py:{arg},{steps_per_stage}",
         f"--workdir={workdir}", "--config.train.log_every=5", f"--config.train.seed={seed}"]
  began, load_before = measure.now(), os.getloadavg()
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
                   "median_tokens_per_sec": steady[len(steady) // 2] if steady else None,
                   # the stage's compile, which dominates short stages on a loaded machine
                   "compile_and_first_step_sec": rs[0].get("compile_and_first_step_sec")})
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  compiles = sum(s["compile_and_first_step_sec"] or 0.0 for s in stages)
  return {"run": arg, "seed": seed, "began": began, "loadavg_before": list(load_before),
          "loadavg_after": list(os.getloadavg()), "wall_sec": wall,
          "wall_sec_less_compiles": wall - compiles, "eval_loss_at_512": summary["eval_loss"],
          "unigram_entropy": summary["unigram_entropy"], "final_train_loss":
          summary["final_train_loss"], "stages": stages,
          "loss_curve": [(r["step"], r["seq_len"], r["loss"]) for r in steps]}


def paired(runs: list[dict]) -> dict:
  """Per seed with both arms done: growlength / fixed wall time and eval loss difference;
  their mean and spread over seeds, and each arm's eval loss over seeds."""
  by_seed: dict[int, dict] = {}
  for r in runs:
    by_seed.setdefault(r["seed"], {})[r["run"]] = r
  pairs = [(seed, d["growlength"], d["fixed"]) for seed, d in sorted(by_seed.items())
           if len(d) == 2]
  return {
      "seeds_paired": [seed for seed, _, _ in pairs],
      "wall_ratio_growlength_over_fixed": measure.spread(g["wall_sec"] / f["wall_sec"]
                                                         for _, g, f in pairs),
      # the same without each stage's compile and first step (what longer stages approach)
      "wall_ratio_less_compiles": measure.spread(
          g["wall_sec_less_compiles"] / f["wall_sec_less_compiles"] for _, g, f in pairs),
      "eval_loss_difference_growlength_minus_fixed": measure.spread(
          g["eval_loss_at_512"] - f["eval_loss_at_512"] for _, g, f in pairs),
      "eval_loss_at_512": {arm: measure.spread(r["eval_loss_at_512"] for r in runs
                                               if r["run"] == arm)
                           for arm in ("growlength", "fixed")},
      "wall_sec": {arm: measure.spread(r["wall_sec"] for r in runs if r["run"] == arm)
                   for arm in ("growlength", "fixed")},
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps_per_stage", type=int, default=75)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                     "growlength.json"))
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  out = {"date": measure.now(), "machine": measure.machine(),
         "command": " ".join(["python", *sys.argv]), "steps_per_stage": args.steps_per_stage,
         "tokens_per_step": 2048, "seeds": seeds, "runs": []}
  print(f"{'run':>11} {'seed':>4} {'wall s':>7} {'eval@512':>9} {'train':>7}  "
        "stages (T x B: tok/s, loss)", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    for i, seed in enumerate(seeds):
      arms = ("growlength", "fixed") if i % 2 == 0 else ("fixed", "growlength")
      for arm in arms:
        r = run(arm, os.path.join(tmp, f"{arm}{seed}"), args.steps_per_stage, seed)
        out["runs"].append(r)
        out.update(paired(out["runs"]), finished=measure.now(), machine_after=measure.machine())
        measure.write_json(args.out, out)
        stages = "; ".join(f"{s['seq_len']}x{s['batch_size']}: {s['median_tokens_per_sec']:.0f},"
                           f" {s['loss_at_end']:.3f}" for s in r["stages"])
        print(f"{arm:>11} {seed:>4} {r['wall_sec']:7.1f} {r['eval_loss_at_512']:9.4f} "
              f"{r['final_train_loss']:7.3f}  {stages}", flush=True)
  print(f"wall ratio growlength/fixed {measure.fmt(out['wall_ratio_growlength_over_fixed'])} "
        f"({measure.fmt(out['wall_ratio_less_compiles'])} less compiles); "
        f"eval loss difference growlength - fixed "
        f"{measure.fmt(out['eval_loss_difference_growlength_minus_fixed'], 4)} nats")


if __name__ == "__main__":
  main()
