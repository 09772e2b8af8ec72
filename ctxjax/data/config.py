"""`config.data` as a typed, frozen DataConfig (parsed by ctxjax/data/settings.py)."""
from __future__ import annotations

import dataclasses
from typing import Any

from ctxjax.data import mixtures
from ctxjax.data.packing import POSITION_MODES
from ctxjax.data.registry import SOURCES
from ctxjax.data.settings import choice, from_mapping, nonnegative, positive, setting

POSITION_IDS = ("data", "randomized", "pose")        # ctxjax/train/step.py: training_positions


# -- config.data -------------------------------------------------------------------

def _source_name(path: str, value: str) -> None:
  SOURCES.check(value, key=path)


def _mixture(path: str, value: dict) -> None:
  """Validated by its own module (unknown keys, kinds, ranges); kind "" = no mixture."""
  if value.get("kind"):
    mixtures.resolve_config(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """`config.data`. The "mixture" source's keys are documented in ctxjax/data/sources.py."""
  name: str = setting("demo", kind=str, check=_source_name)  # ctxjax/data/registry.py
  seq_len: int = setting(kind=int, check=positive)
  batch_size: int = setting(kind=int, check=positive)       # GLOBAL rows per optimizer step
  data_dir: str = setting("", kind=str)                      # "" -> $CTXJAX_DATA_DIR or cache
  packed_positions: str = setting("per_document", kind=str, check=choice(*POSITION_MODES))
  position_ids: str = setting("data", kind=str, check=choice(*POSITION_IDS))
  max_position_id: int | None = setting(None, kind=int, optional=True, check=positive)
  # "mixture" source: corpus, tokenizer, length mixture, grain pipeline
  jsonl: Any = setting("", kind=None)                        # a path, "a,b" or a list of paths
  tfds_name: str = setting("", kind=str)
  tfds_data_dir: str = setting("", kind=str)
  tfds_text_feature: str = setting("text", kind=str)
  tfds_source_feature: str = setting("", kind=str, optional=True)
  tfds_eval_split: str = setting("validation", kind=str, optional=True)
  validation_fraction: float = setting(0.02, kind=float)
  tokenizer: str = setting("", kind=str)
  mixture: dict | None = setting(None, kind=dict, optional=True, check=_mixture)
  shuffle_seed: int | None = setting(None, kind=int, optional=True)  # None: train.seed
  shuffle_rows: bool = setting(True, kind=bool)
  num_threads: int = setting(2, kind=int, check=nonnegative)
  prefetch_batches: int = setting(4, kind=int, check=nonnegative)
  workdir: str = setting("", kind=str)           # where mixture_stats.json goes; "" = nowhere
  # Set by the trainer per stage: this process's row block of the global batch.
  process_index: int = setting(0, kind=int, check=nonnegative)
  process_count: int = setting(1, kind=int, check=positive)

  def __post_init__(self):
    if self.position_ids != "data" and self.max_position_id is None:
      raise ValueError(f"data.max_position_id is required with "
                       f"data.position_ids={self.position_ids!r}")

  def process_rows(self) -> slice:
    """The rows of the global batch this process feeds (all of them on one host)."""
    if self.batch_size % self.process_count:
      raise ValueError(f"data.batch_size={self.batch_size} is not divisible by the "
                       f"{self.process_count} processes feeding it")
    rows = self.batch_size // self.process_count
    return slice(self.process_index * rows, (self.process_index + 1) * rows)


def data_config(mapping) -> DataConfig:
  """`config.data` validated (see module doc)."""
  return from_mapping(DataConfig, mapping, "data")
