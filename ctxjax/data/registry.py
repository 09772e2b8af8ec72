"""Data sources the trainer can read, by `config.data.name` (a registry).

Each builder takes (DataConfig, model config, seed=) and returns an object with
`train_batches()` (endless iterator of numpy batches: inputs, targets, positions, segment_ids,
loss_mask, each [batch, seq_len]), `eval_batches()`, `unigram_entropy()` (nats/token; the loss
a model that ignores context would reach), and `train_state()` / `restore_train(state)` (a
JSON-able position, checkpointed with the model so a resumed run sees exactly the batches it
would have seen).

Multi-host: the trainer sets `process_index` / `process_count` in the DataConfig (this
process's row block of the global batch, ctxjax/train/sharding.py: process_batch_block); a
source yields only that block's `batch_size // process_count` rows (DataConfig.process_rows).

Builders import their modules when called: reading this table stays cheap (no grain).
"""
from __future__ import annotations

from ctxjax.registry import Registry

SOURCES = Registry("data.name")


@SOURCES.register("demo")
def _demo(data_cfg, model_cfg, *, seed: int):
  """The bundled demo corpus (built from text on this machine), sentencepiece, packed rows."""
  from ctxjax.data.demo import DemoSource
  return DemoSource(data_cfg, model_cfg, seed)


@SOURCES.register("mixture")
def _mixture(data_cfg, model_cfg, *, seed: int):
  """corpus -> sentencepiece -> length mixture -> grain pipeline (ctxjax/data/sources.py)."""
  from ctxjax.data.sources import MixtureSource
  return MixtureSource(data_cfg, model_cfg, seed)


@SOURCES.register("demo_landmark")
def _demo_landmark(data_cfg, model_cfg, *, seed: int):
  """"demo" rows with landmark tokens (Mohtashami & Jaggi 2023; ctxjax/data/landmark.py)."""
  from ctxjax.data.landmark import LandmarkSource
  return LandmarkSource(_demo, data_cfg, model_cfg, seed)


@SOURCES.register("mixture_landmark")
def _mixture_landmark(data_cfg, model_cfg, *, seed: int):
  """"mixture" rows with landmark tokens (ctxjax/data/landmark.py)."""
  from ctxjax.data.landmark import LandmarkSource
  return LandmarkSource(_mixture, data_cfg, model_cfg, seed)


def build(data_cfg, model_cfg, *, seed: int):
  """The source `data_cfg.name` (a DataConfig: ctxjax/data/config.py) names."""
  return SOURCES.get(data_cfg.name)(data_cfg, model_cfg, seed=seed)
