"""Runs a study's items as worker processes, at most `parallel` at once, in dependency order.

Resumable by construction: an item whose output holds `done.json` is skipped, and a training
item killed half-way resumes from its newest checkpoint when it runs again. Workers die with
the scheduler (Linux: PR_SET_PDEATHSIG), so a killed study leaves no orphan training.
Each worker's output goes to DIR/logs/<item>.log. A failed item does not stop the others: the
items that need it are skipped, everything else runs, and the study then fails with one line
naming each failed item and its log (running the command again retries them).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Callable

from ctxjax.study import item as item_lib
from ctxjax.study.plan import Item


class ItemFailed(RuntimeError):
  """A worker exited non-zero (its log holds the reason)."""


def _die_with_parent() -> None:
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:  # not Linux: workers may outlive a killed scheduler
    pass


def log_path(workdir: str, item: Item) -> str:
  return os.path.join(workdir, "logs", item.name.replace(":", "_") + ".log")


def _start(workdir: str, item: Item, env: dict) -> subprocess.Popen:
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  log = open(log_path(workdir, item), "ab")
  cmd = [sys.executable, "-m", "ctxjax.study.item", f"--workdir={workdir}", f"--name={item.name}"]
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                          preexec_fn=_die_with_parent if sys.platform == "linux" else None)
  log.close()
  return proc


def _last_line(path: str) -> str:
  try:
    with open(path, errors="replace") as f:
      lines = [ln.strip() for ln in f if ln.strip()]
  except OSError:
    return ""
  return lines[-1] if lines else ""


def _dependency_order(pending: list[Item], done: set) -> list[Item]:
  order, seen, left = [], set(done), list(pending)
  while left:
    ready = [it for it in left if all(a in seen for a in it.after)]
    if not ready:
      raise ItemFailed(f"items {[it.name for it in left]} wait on items the plan lacks")
    for it in ready:
      order.append(it)
      seen.add(it.name)
      left.remove(it)
  return order


def run_items(workdir: str, items: list[Item], *, parallel: int, env: dict | None = None,
              on_finish: Callable[[Item, float, bool], None] = lambda *_: None) -> None:
  """Runs every item not yet done; `on_finish(item, wall_sec, skipped)` after each.
  parallel=0 runs them one by one in this process (no worker start-up; compiled programs
  shared between items: the tests' mode)."""
  env = dict(os.environ if env is None else env)
  # Items of one model config (the ablation's mixtures, an eval after its twin) compile the
  # same programs: a persistent compilation cache shared by the workers compiles them once.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  done = set()
  for it in items:
    if item_lib.is_done(workdir, it):
      done.add(it.name)
      on_finish(it, 0.0, True)
  pending = [it for it in items if it.name not in done]
  # The critical path first: items that others wait on.
  waiters = {it.name: sum(it.name in o.after for o in items) for it in items}
  pending.sort(key=lambda it: -waiters[it.name])
  if parallel == 0:
    for it in _dependency_order(pending, done):
      start = time.perf_counter()
      item_lib.run_item(workdir, it.name)
      on_finish(it, time.perf_counter() - start, False)
    return
  running: dict[str, tuple[subprocess.Popen, Item, float]] = {}
  failed: dict[str, str] = {}  # item -> one line; its dependents are not started
  try:
    while pending or running:
      blocked = [it for it in pending if any(a in failed for a in it.after)]
      for it in blocked:
        pending.remove(it)
        failed[it.name] = f"not run: needs {[a for a in it.after if a in failed]}"
      ready = [it for it in pending if all(a in done for a in it.after)]
      while ready and len(running) < parallel:
        it = ready.pop(0)
        pending.remove(it)
        running[it.name] = (_start(workdir, it, env), it, time.perf_counter())
      if not running:
        if pending:
          missing = sorted({a for it in pending for a in it.after} - done)
          raise ItemFailed(f"items {[it.name for it in pending]} wait on {missing}, "
                           "which no item of the plan provides")
        break
      time.sleep(0.2)
      for name, (proc, it, start) in list(running.items()):
        code = proc.poll()
        if code is None:
          continue
        del running[name]
        if code != 0 or not item_lib.is_done(workdir, it):
          log = log_path(workdir, it)
          failed[name] = f"exit {code}: {_last_line(log)} [log: {log}]"
          continue
        done.add(name)
        on_finish(it, time.perf_counter() - start, False)
  finally:
    for proc, _, _ in running.values():
      proc.terminate()
    for proc, _, _ in running.values():
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
  if failed:
    raise ItemFailed(f"{len(failed)} item(s) failed; the others finished: "
                     + "; ".join(f"{k}: {v}" for k, v in failed.items()))
