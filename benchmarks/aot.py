"""AOT pod checks of every shipped pod/GPU recipe: `python -m ctxjax.aot` per recipe (every LWM
stage), results merged into benchmarks/results/aot.json, and the markdown table of
benchmarks/README.md ("AOT pod checks") printed from it.

  pip install libtpu            # the TPU compiler, for the topology checks (no TPU needed)
  python benchmarks/aot.py      # all recipes (about an hour on 2 CPU cores)
  python benchmarks/aot.py --table_only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "aot.json")
# (recipe, stages): each recipe is checked against its own config.aot target.
RECIPES = [("configs/llama2_7b_80k.py", [None]), ("configs/llama2_13b_64k.py", [None]),
           ("configs/lwm_1m.py", [0, 1, 2, 3, 4]), ("configs/llama2_7b_8xh100.py", [None]),
           ("configs/llama2_7b_8xh100.py:ring", [None]),
           ("configs/maxtext_llama3_8b_v6e.py", [None])]  # a published MaxText step time
GiB = 1024 ** 3


def check_all(path: str) -> None:
  for recipe, stages in RECIPES:
    for stage in stages:
      cmd = [sys.executable, "-m", "ctxjax.aot", f"--config={recipe}", f"--json={path}"]
      cmd += [] if stage is None else [f"--stage={stage}"]
      print("$", " ".join(cmd[1:]), flush=True)
      subprocess.run(cmd, cwd=ROOT, check=False)


def table(reports: list[dict]) -> str:
  rows = ["| recipe | stage | target | mesh (data, fsdp, context, tensor) | seq_len x batch | "
          "per-chip GiB (args + temps) | fits | model FLOPs/step | predicted s/step (binds) | "
          "predicted MFU | est. s/step at MFU | stage time | compile s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in reports:
    mesh = ", ".join(str(r["mesh"][a]) for a in ("data", "fsdp", "context", "tensor"))
    if "total_gib" in r:
      mem = (f"{r['total_gib']:.1f} of {r['capacity_gib']:.0f} "
             f"({r['arguments_bytes'] / GiB:.1f} + {r['temporaries_bytes'] / GiB:.1f})")
    else:
      mem = "refused by the compiler"
    fits = {True: "yes", False: "**no**", None: "n/a (CPU)"}[r["fits"]]
    p = r.get("predicted")
    pred = (f"{p['step_sec']:.1f} ({p['binding']}) | {p['mfu']:.2f}" if p else "n/a | n/a")
    rows.append(
        f"| {os.path.basename(r['config'])} | {r['stage']} | {r['target']} | {mesh} | "
        f"{r['seq_len']:,} x {r['batch_size']} | {mem} | {fits} | "
        f"{r['model_flops_per_step']:.2e} | {pred} | {r['est_step_sec']:.1f} at {r['mfu']:g} | "
        f"{r['steps']} steps, {r['est_stage_hours']:.1f} h | {r['compile_sec']:.0f} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=RESULTS)
  parser.add_argument("--table_only", action="store_true")
  args = parser.parse_args()
  if not args.table_only:
    check_all(args.json)
  with open(args.json, encoding="utf-8") as f:
    print(table(json.load(f)))


if __name__ == "__main__":
  main()
