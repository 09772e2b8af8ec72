"""XLA compiler options the train and eval steps are compiled with, per platform.

XLA:CPU (jax 0.10) routes dots through YNNPACK fusions by default
(`xla_cpu_experimental_ynn_fusion_type`). On this project's CPU machine XLA's own dot emitter
trains the tiny model 12-20% faster at T=256 and 25-33% faster at T=1024 (benchmarks/README.md,
"Training throughput": interleaved A/B of benchmarks/throughput.py; 16% at both lengths on a
Zen 4 EPYC, "XLA:CPU options on your CPU"), so CPU steps are compiled with the YNN fusions off.
`python benchmarks/xla_options.py` compares option sets on any CPU, in one process. Options go
to `jax.jit(compiler_options=...)` of the steps only: nothing process-wide changes, and other
platforms (GPU, TPU, an AOT TPU topology compiled on a CPU host) get XLA's defaults. A user's
own XLA_FLAGS setting of the option wins; the environment variable CTXJAX_XLA_DEFAULTS=1 keeps
XLA's defaults everywhere.
"""
from __future__ import annotations

import os

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def step_compiler_options(mesh=None) -> dict | None:
  """Options for a step that runs on `mesh`'s devices (None: the default backend)."""
  if os.environ.get("CTXJAX_XLA_DEFAULTS", "") == "1":
    return None
  platform = (mesh.devices.flat[0].platform if mesh is not None and hasattr(mesh, "devices")
              else jax.default_backend())
  if platform != "cpu":
    return None
  user_flags = os.environ.get("XLA_FLAGS", "")
  options = {k: v for k, v in CPU_OPTIONS.items() if k not in user_flags}
  return options or None
