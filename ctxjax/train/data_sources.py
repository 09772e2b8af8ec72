"""Data sources the trainer can read, by `config.data.name` (a registry).

Each builder returns an object with `train_batches()` (endless iterator of numpy batches:
inputs, targets, positions, segment_ids, loss_mask, each [batch, seq_len]), `eval_batches()`,
`unigram_entropy()` (nats/token; the loss a model that ignores context would reach), and
`train_state()` / `restore_train(state)` (a JSON-able position, checkpointed with the model so
a resumed run sees exactly the batches it would have seen).

Multi-host: the trainer sets `data_cfg.process_index` / `process_count` (this process's row
block of the global batch, ctxjax/train/sharding.py: process_batch_block); a source yields
only that block's `batch_size // process_count` rows.
"""
from __future__ import annotations

from typing import Callable

SOURCES: dict[str, Callable] = {}


def register_source(name: str):
  def wrap(fn):
    SOURCES[name] = fn
    return fn
  return wrap


def build(data_cfg, model_cfg, *, seed: int):
  name = data_cfg.name
  if name not in SOURCES:
    raise ValueError(f"data.name={name!r}; valid choices: {sorted(SOURCES)}")
  return SOURCES[name](data_cfg, model_cfg, seed=seed)


def process_rows(data_cfg) -> slice:
  """The rows of the global batch this process feeds (all of them on one host)."""
  index, count = int(data_cfg.get("process_index", 0)), int(data_cfg.get("process_count", 1))
  if data_cfg.batch_size % count:
    raise ValueError(f"data.batch_size={data_cfg.batch_size} is not divisible by the "
                     f"{count} processes feeding it")
  rows = data_cfg.batch_size // count
  return slice(index * rows, (index + 1) * rows)


class _DemoSource:
  """The bundled demo corpus (built from text on this machine), sentencepiece, packed rows."""

  def __init__(self, data_cfg, model_cfg, seed):
    from ctxjax.data.demo import DemoData
    common = dict(seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size,
                  vocab_size=model_cfg.vocab_size, seed=seed,
                  data_dir=data_cfg.get("data_dir") or None,
                  positions=data_cfg.get("packed_positions", "per_document"))
    self._train = DemoData(split="train", **common)
    self._common = common
    self._rows = process_rows(data_cfg)

  def train_batches(self):
    # Every process packs the same global batch (cheap for the demo corpus) and keeps its rows,
    # so the data state is the same on every process.
    return ({k: v[self._rows] for k, v in batch.items()} for batch in self._train)

  def eval_batches(self):
    from ctxjax.data.demo import DemoData
    return ({k: v[self._rows] for k, v in batch.items()}
            for batch in DemoData(split="validation", **self._common))

  def unigram_entropy(self) -> float:
    return float(self._train.unigram_entropy())

  def train_state(self) -> dict:
    return self._train.state

  def restore_train(self, state: dict) -> None:
    self._train.restore(state)


register_source("demo")(_DemoSource)

from ctxjax.data import sources as _mixture_source  # noqa: E402,F401  registers "mixture"
