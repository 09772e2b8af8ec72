"""What every comparison benchmark records: when and where it ran (the clock, the CPU model, the
load), results written after each run (a cut run keeps what finished), mean and spread over
seeds."""
from __future__ import annotations

import datetime
import json
import os
import platform
import time

import numpy as np


def now() -> str:
  """UTC wall-clock time, to the second."""
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  """The host as a benchmark's JSON names it; the load shows how shared it was."""
  return {"cpu": cpu_model(), "cpus": os.cpu_count(), "loadavg": list(os.getloadavg())}


def write_json(path: str, obj) -> None:
  """Replace `path` atomically: a run killed mid-write leaves the previous complete file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def spread(values) -> dict:
  """Mean, sample standard deviation (ddof 1; 0 for one value), min, max and count."""
  x = np.asarray([v for v in values if v is not None], np.float64)
  if x.size == 0:
    return {"n": 0}
  return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
          "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}


def fmt(s: dict, digits: int = 3) -> str:
  """"mean ± std (n)" of a `spread` dict."""
  if not s.get("n"):
    return "-"
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (n={s['n']})"


def time_train_steps(step, state, batch, steps: int):
  """Run `step(state, batch) -> (state, metrics)` once untimed (compilation), then `steps` times,
  each waited for -> (state, metrics, [seconds per step], seconds of the first call)."""
  import jax  # noqa: PLC0415  (this module stays importable without jax)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, metrics, times, first
