"""Memory layers on passkey retrieval: configs/tiny_passkey.py's 2-layer model trained at 256
tokens as a plain model and as each memory kind (configs/tiny_{memorizing,fot}.py:passkey, and
configs/tiny_longmem.py:passkey on top of the plain run), then passkey accuracy at 1x and 4x
the training length.

  python -m configs.tiny_passkey        # once: prepares the passkey corpus
  python benchmarks/memory_layers.py [--steps=600] [--lengths=256,1024] [--samples=2]

The plain model decodes with ctxjax.eval.generation.generate (its kv cache, full attention over
the whole prompt); memory models with ctxjax.model.memory_inference.generate_fn, window by
window, their memory enlarged at evaluation to hold the whole prompt (memory_size is not a
parameter). Writes benchmarks/results/memory_layers.json after every run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402  (benchmarks/measure.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {  # name -> (config, extra flags); longmem starts from the plain run
    "plain": ("configs/tiny_passkey.py", []),
    "memorizing": ("configs/tiny_memorizing.py:passkey", []),
    "fot": ("configs/tiny_fot.py:passkey", []),
    "longmem": ("configs/tiny_longmem.py:passkey", ["--config.train.init_from={plain}"]),
}


def train(name: str, workdir: str, steps: int, dirs: dict) -> float:
  config, extra = RUNS[name]
  cmd = [sys.executable, "-m", "ctxjax.train", f"--config={config}", f"--workdir={workdir}",
         f"--config.train.steps={steps}", f"--config.train.save_every={steps}",
         "--config.train.async_checkpoints=False", "--config.train.eval_batches=4",
         *[e.format(**dirs) for e in extra]]
  start = time.time()
  subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  return time.time() - start


def passkey(name: str, workdir: str, lengths, samples: int) -> dict:
  from ctxjax.eval import generation, retrieval, run  # noqa: PLC0415
  from ctxjax.model import Transformer, memory_inference  # noqa: PLC0415
  loaded = run.load_run(workdir)
  model, generate_fn = loaded.model, generation.generate
  if model.cfg.memory_kind != "none":  # the memory holds the whole prompt at evaluation
    model = Transformer(dataclasses.replace(model.cfg, memory_size=max(lengths) + 64))
    generate_fn = memory_inference.generate_fn
  start = time.time()
  grid = retrieval.retrieval_grid(generate_fn, model, loaded.variables, loaded.tokenizer,
                                  "passkey", lengths, (0.0, 0.25, 0.5, 0.75, 1.0),
                                  samples=samples, batch_size=5, model_name=name)
  by_length = [sum(row[i] for row in grid["scores"]) / len(grid["scores"])
               for i in range(len(lengths))]
  return {"accuracy": dict(zip(map(str, lengths), by_length)),
          "eval_sec": time.time() - start}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--lengths", default="256,1024")
  parser.add_argument("--samples", type=int, default=2)
  parser.add_argument("--runs", default=",".join(RUNS))
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "memory_layers.json"))
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  out = args.out
  results = {"started": measure.now(), "machine": measure.machine(), "steps": args.steps,
             "lengths": lengths, "runs": {}}
  with tempfile.TemporaryDirectory() as tmp:
    dirs = {name: os.path.join(tmp, name) for name in RUNS}
    for name in args.runs.split(","):
      wall = train(name, dirs[name], args.steps, dirs)
      results["runs"][name] = {"train_sec": wall, **passkey(name, dirs[name], lengths,
                                                             args.samples)}
      results["machine_after"] = measure.machine()
      print(name, results["runs"][name], flush=True)
      measure.write_json(out, results)


if __name__ == "__main__":
  main()
