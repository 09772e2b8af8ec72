"""Landmark generation with and without the key/value cache (Mohtashami & Jaggi 2023, Section
3.2): seconds per generated token of ctxjax.model.landmark_generate (prefill + cached decode
steps) and landmark_generate_uncached (a forward over the whole buffer per token).

  nice -n 19 python benchmarks/landmark_generate.py --slots=256,1024 --new=32 --rounds=5

configs/tiny.py's shapes (d 256, 4 layers, 4 heads of 64) as configs/tiny_landmark.py makes them
(mem_freq 31, top-2 retrieval, vocab 1025), random weights, fp32, batch 1, greedy; a prompt of
`slots` slots (landmarks included). Per prompt length, compiles excluded (each program runs once
first), the median over `rounds` (cached, prefill, uncached interleaved in each round) of:
cached seconds / new, the cached decode alone ((cached - prefill) / new, the prefill timed on its
own), uncached seconds / new; in wall seconds and in this process's CPU seconds (all threads:
less moved by other processes on a shared machine). Whether both gave the same tokens. Prints a
table and the machine's load; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import measure  # noqa: E402  (benchmarks/measure.py)
from configs import tiny_landmark  # noqa: E402
from ctxjax.attention.landmark import with_landmarks  # noqa: E402
from ctxjax.model import landmark_generate as lg  # noqa: E402
from ctxjax.model import model_config_from_dict  # noqa: E402
from ctxjax.model.transformer import Transformer  # noqa: E402


def _model():
  model = Transformer(model_config_from_dict(tiny_landmark.get_config().model.to_dict()))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  return model, variables


def _timed(fn):
  """(wall seconds, CPU seconds of this process, all threads) of fn() and its result."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - wall, time.process_time() - cpu, out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--slots", default="256,1024", help="prompt lengths in slots")
  ap.add_argument("--new", type=int, default=32, help="max_new_tokens")
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args(argv)
  model, variables = _model()
  opts = model.cfg.attention_options
  mem_freq, mark = opts["mem_freq"], opts["landmark_token_id"]
  print(f"machine {measure.machine()}, {measure.now()}")
  print("| prompt slots | cached s/token | cached decode s/token | prefill s | "
        "uncached s/token | uncached / cached | same tokens |")
  print("|---|---|---|---|---|---|---|")
  for slots in (int(s) for s in args.slots.split(",")):
    length = slots - slots // (mem_freq + 1)        # content tokens of `slots` slots
    prompt = np.random.default_rng(0).integers(0, mark, (1, length)).astype(np.int32)
    prompt_slots = jnp.asarray(with_landmarks(prompt, mem_freq, mark))
    total = with_landmarks(np.zeros((1, length + args.new), np.int32), mem_freq, mark).shape[1]
    capacity = lg.cache_capacity(mem_freq, total)
    runs = {"cached": lambda: lg.landmark_generate(model, variables, prompt, args.new),
            "prefill": lambda: lg.prefill(model, variables, prompt_slots, capacity),
            "uncached": lambda: lg.landmark_generate_uncached(model, variables, prompt, args.new)}
    out = {name: fn() for name, fn in runs.items()}   # compiles
    times = {name: [] for name in runs}
    for _ in range(args.rounds):   # interleaved: each program sees the same load
      for name, fn in runs.items():
        times[name].append(_timed(fn)[:2])
    wall = {name: float(np.median([w for w, _ in t])) for name, t in times.items()}
    cpu = {name: float(np.median([c for _, c in t])) for name, t in times.items()}
    for label, med in (("wall", wall), ("cpu", cpu)):
      print(f"| {prompt_slots.shape[1]} ({label}) | {med['cached'] / args.new:.4f} | "
            f"{(med['cached'] - med['prefill']) / args.new:.4f} | {med['prefill']:.3f} | "
            f"{med['uncached'] / args.new:.4f} | {med['uncached'] / med['cached']:.1f}x | "
            f"{np.array_equal(out['cached'], out['uncached'])} |")
  print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
