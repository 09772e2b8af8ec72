"""ctxjax.host_memory: with its environment a CPU step's large temporary is faulted in as huge
pages, not 4 KiB pages anew on every call.

Measured in fresh subprocesses (glibc reads GLIBC_TUNABLES at start-up): a jitted program whose
64 MiB temporary (a dot's result) glibc maps and unmaps on every call.
"""
import json
import os
import subprocess
import sys

import pytest

from ctxjax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMP_PAGES = 4096 * 4096 * 4 // 4096  # the [4096, 4096] float32 temporary, in 4 KiB pages

_SCRIPT = """
import json
import jax, jax.numpy as jnp

def minor_faults():
  with open("/proc/self/stat") as f:
    return int(f.read().rsplit(")", 1)[1].split()[7])

@jax.jit
def program(x, w):
  return jnp.sum(jnp.tanh(x @ w) @ w.T)   # x @ w: a [4096, 4096] temporary

x = jnp.full((4096, 256), 1e-3, jnp.float32)
w = jnp.full((256, 4096), 1e-3, jnp.float32)
for _ in range(3):
  program(x, w).block_until_ready()
before = minor_faults()
for _ in range(5):
  program(x, w).block_until_ready()
print(json.dumps({"faults_per_call": (minor_faults() - before) / 5}))
"""


def _thp_available() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
      mode = f.read()
  except OSError:
    return False
  libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else ""
  version = tuple(int(p) for p in libc.split()[-1].split(".")[:2]) if libc else (0, 0)
  return "[never]" not in mode and version >= (2, 35)


def _faults_per_call(env: dict) -> float:
  env = {**env, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])["faults_per_call"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _thp_available(),
                    reason="needs glibc >= 2.35 and transparent huge pages (madvise or always)")
def test_huge_pages_stop_the_per_call_page_faults_of_a_large_temporary():
  plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  defaults = _faults_per_call({**plain, host_memory.OPT_OUT: "1"})
  tuned = _faults_per_call(host_memory.cpu_environment(plain))
  # glibc maps the 64 MiB temporary afresh on every call: each of its 4 KiB pages faults again
  assert defaults > 0.9 * TEMP_PAGES, defaults
  # as transparent huge pages: 32 faults of 2 MiB (plus small change)
  assert tuned < 0.05 * TEMP_PAGES, tuned


def test_cpu_environment_adds_the_tunable_once_and_respects_the_user():
  assert host_memory.cpu_environment({})["GLIBC_TUNABLES"] == host_memory.TUNABLE
  env = host_memory.cpu_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{host_memory.TUNABLE}"
  assert host_memory.cpu_environment(env) == env
  assert host_memory.active(env) and not host_memory.active({})
  mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}       # the user's own value wins
  assert host_memory.cpu_environment(mine) == mine
  assert "GLIBC_TUNABLES" not in host_memory.cpu_environment({host_memory.OPT_OUT: "1"})
