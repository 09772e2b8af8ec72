"""Transparent huge pages for glibc's large blocks on CPU runs: the setting and its environment.

XLA:CPU allocates each execution's temporary buffer (for a train step: the activations kept for
the backward pass, ~240 MiB for configs/tiny.py at 2048 tokens per step) with malloc, and glibc
maps a block that large afresh with mmap and unmaps it when it is freed, so every step faults all
of its 4 KiB pages in again: 62k minor faults and ~110 ms of kernel time per ~400 ms step of
configs/tiny.py on a 2-core machine, against 4k faults and 9 ms for PyTorch's step. With glibc's
tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent huge pages on the
blocks it maps (madvise), and a step takes ~400 faults instead: 13% more tokens/s at T=256 and
at T=1024 in benchmarks/throughput.py (benchmarks/README.md, "Page faults").

glibc reads GLIBC_TUNABLES once, when the process starts, so the setting is an environment:
launch/local.sh exports `cpu_environment()`'s value for `train` and `study`, benchmarks/throughput.py runs ctxjax's side
with it, and a user who runs `python -m ctxjax.train` directly exports it first:
  export GLIBC_TUNABLES=glibc.malloc.hugetlb=1
It needs the kernel's transparent huge pages in `madvise` or `always` mode
(/sys/kernel/mm/transparent_hugepage/enabled). CTXJAX_MALLOC_DEFAULTS=1 leaves glibc's defaults.
"""
from __future__ import annotations

import os

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "CTXJAX_MALLOC_DEFAULTS"


def active(env=None) -> bool:
  """Whether `env` (default: this process's environment) asks glibc for huge pages."""
  env = os.environ if env is None else env
  return "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", "")


def cpu_environment(env=None) -> dict:
  """A copy of `env` (default: os.environ) with the tunable added to GLIBC_TUNABLES, unless
  it is there already (any value: the user's choice wins) or CTXJAX_MALLOC_DEFAULTS=1."""
  env = dict(os.environ if env is None else env)
  if env.get(OPT_OUT, "") == "1" or active(env):
    return env
  env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES", ""), TUNABLE)))
  return env


if __name__ == "__main__":  # launch/local.sh: the GLIBC_TUNABLES value to export
  print(cpu_environment().get("GLIBC_TUNABLES", ""))
