"""Multi-host start-up: one `jax.distributed.initialize` per process, before any device is used.

Where the coordinator comes from, first match wins:
  1. flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (launch/slurm.sh
     passes them), or the env vars CTXJAX_COORDINATOR / CTXJAX_NUM_PROCESSES /
     CTXJAX_PROCESS_ID;
  2. a cluster JAX detects by itself — a multi-host Cloud TPU VM slice (TPU_WORKER_HOSTNAMES
     lists more than one worker) or a SLURM job step with more than one task;
  3. otherwise a single process: nothing to do.
On CPU, cross-process collectives go over gloo (the two-process test in tests/test_multihost.py).
"""
from __future__ import annotations

import os

import jax
from absl import logging

ENV = {"coordinator_address": "CTXJAX_COORDINATOR", "num_processes": "CTXJAX_NUM_PROCESSES",
       "process_id": "CTXJAX_PROCESS_ID"}


def _explicit(coordinator_address, num_processes, process_id) -> dict:
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  for key, var in ENV.items():
    if given[key] in (None, "") and os.environ.get(var):
      given[key] = os.environ[var]
  if not any(v not in (None, "") for v in given.values()):
    return {}
  missing = [f"--{k} (or ${ENV[k]})" for k, v in given.items() if v in (None, "")]
  if missing:
    raise ValueError(f"multi-host start-up needs all of coordinator address, process count and "
                     f"process id; missing: {', '.join(missing)}")
  num, pid = int(given["num_processes"]), int(given["process_id"])
  if num < 1 or not 0 <= pid < num:
    raise ValueError(f"process_id={pid} must lie in [0, num_processes={num})")
  return {"coordinator_address": str(given["coordinator_address"]), "num_processes": num,
          "process_id": pid}


def _cluster_detected() -> bool:
  workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return ("," in workers) or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """Join the multi-process system if this run is one (see the module docstring)."""
  kwargs = _explicit(coordinator_address, num_processes, process_id)
  if not kwargs and not _cluster_detected():
    return
  if kwargs.get("num_processes") == 1:
    return
  if (os.environ.get("JAX_PLATFORMS", "") or "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
