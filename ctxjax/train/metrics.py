"""Metrics sinks: WORKDIR/metrics.jsonl (one JSON object per logged step) + TensorBoard scalars
(ctxjax/train/tb_events.py).

A remote workdir (gs://...) cannot be appended to: both are written in a local staging
directory (metrics.jsonl seeded with the workdir's, so a resumed run appends) and mirrored into
the workdir at the first write, every SYNC_SEC seconds and at close.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from ctxjax import storage
from ctxjax.train import tb_events

SYNC_SEC = 30.0  # a killed run with a remote workdir loses at most this much of its metrics


class MetricsWriter:
  """Appends to metrics.jsonl and writes TensorBoard scalars; only process 0 writes."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._mirror = None
    if not enabled:
      return
    storage.makedirs(workdir)
    if not storage.is_local(workdir):
      local = tempfile.mkdtemp(prefix="ctxjax-metrics-")
      self._mirror = storage.Mirror(local, workdir, every_sec=SYNC_SEC)
      if storage.exists(remote := storage.join(workdir, "metrics.jsonl")):
        storage.copy_file(remote, os.path.join(local, "metrics.jsonl"))
      workdir = local
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = tb_events.ScalarWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()  # a few hundred bytes per logged step: TensorBoard sees them at once
    self._sync(force=False)

  def _sync(self, force: bool):
    if self._mirror is not None:
      if self._tb is not None:
        self._tb.flush()
      self._mirror.sync(force=force)

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    self._sync(force=True)
    if self._mirror is not None:
      shutil.rmtree(self._mirror.local, ignore_errors=True)
      self._mirror = None


def _plain(value):
  try:
    return float(value) if not isinstance(value, (int, str)) else value
  except TypeError:
    return str(value)
