"""Landmark tokens in training rows (Mohtashami & Jaggi 2023, Section 3.1).

Rows of `seq_len` slots are cut into blocks of `mem_freq + 1`; slot `mem_freq` of every block
holds the landmark token, the other slots hold the content tokens of a row of
`content_length(seq_len, mem_freq)` tokens, in order. So the landmark follows every `mem_freq`
tokens of the row, and the attention (ctxjax/attention/landmark.py) reads block boundaries from
the slot index. Fields (ctxjax/data/packing.py):

  inputs/targets  content slots keep theirs: a token right before a landmark still predicts the
                  next CONTENT token (no content target is lost); a landmark slot has input and
                  target = the landmark id and loss_mask 0 (its own label is ignored).
  segment_ids     a landmark belongs to the segment of the token before it.
  positions       a landmark occupies one position, as in the paper's LLaMA fine-tuning (position
                  ids over the sequence with landmarks inserted): within a row the positions of a
                  segment run consecutively over its slots, landmarks included, from p0 + p0 //
                  mem_freq, where p0 is the source's position of the segment's first token in
                  the row (p0 // mem_freq landmarks precede it in its document).

`LandmarkSource` wraps a data source (registry names "demo_landmark", "mixture_landmark"):
the inner source packs content rows with a content vocabulary of `vocab_size - 1` pieces and
the model's last id, `vocab_size - 1`, is the landmark (model.attention_options
.landmark_token_id must name it).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ctxjax.attention.landmark import landmark_slots


def content_length(seq_len: int, mem_freq: int) -> int:
  """Content slots in a row of seq_len slots (one landmark closes each full block)."""
  return seq_len - seq_len // (mem_freq + 1)


def _positions(positions_c, segments, mem_freq):
  """Slot positions of the module doc: [B, T] from content positions already scattered."""
  b, t = segments.shape
  starts = np.ones((b, t), bool)
  starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
  idx = np.broadcast_to(np.arange(t), (b, t))
  first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)   # first slot of the run
  p0 = np.take_along_axis(positions_c, first, axis=1)  # a content slot: landmarks join the left run
  return (p0 + p0 // mem_freq + idx - first).astype(np.int32)


def insert_landmarks(batch: dict, *, seq_len: int, mem_freq: int, landmark_id: int) -> dict:
  """A batch of content rows [B, content_length(seq_len, mem_freq)] -> rows of seq_len slots
  (the fields of the module doc)."""
  is_mem = landmark_slots(seq_len, mem_freq)
  n = int((~is_mem).sum())
  rows = batch["inputs"].shape[0]
  if batch["inputs"].shape[1] != n:
    raise ValueError(f"landmark rows of {seq_len} slots need {n} content tokens per row, got "
                     f"{batch['inputs'].shape[1]}")
  out = {}
  for key, fill in (("inputs", landmark_id), ("targets", landmark_id), ("loss_mask", 0),
                    ("segment_ids", 0), ("positions", 0)):
    x = np.asarray(batch[key])
    full = np.full((rows, seq_len), fill, x.dtype)
    full[:, ~is_mem] = x
    out[key] = full
  prev = np.flatnonzero(is_mem) - 1                                  # always a content slot
  out["segment_ids"][:, is_mem] = out["segment_ids"][:, prev]
  out["positions"] = _positions(out["positions"], out["segment_ids"], mem_freq)
  return out


def _content_model_config(model_cfg):
  """The model config the inner source sees: the content vocabulary (landmark id excluded)."""
  opts = model_cfg.attention_options
  if model_cfg.attention_mode != "landmark":
    raise ValueError(f"data.name=*_landmark needs model.attention_mode='landmark', got "
                     f"{model_cfg.attention_mode!r}")
  if opts["landmark_token_id"] != model_cfg.vocab_size - 1:
    raise ValueError(f"model.attention_options.landmark_token_id must be the last id, "
                     f"vocab_size - 1 = {model_cfg.vocab_size - 1}, got "
                     f"{opts['landmark_token_id']} (the data source's tokenizer has "
                     f"vocab_size - 1 pieces)")
  return dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size - 1)


class LandmarkSource:
  """A data source whose rows get landmark tokens (module doc); everything else (state,
  entropy, statistics) is the inner source's."""

  def __init__(self, build_inner, data_cfg, model_cfg, seed: int):
    opts = model_cfg.attention_options if model_cfg.attention_mode == "landmark" else {}
    self._insert = dict(seq_len=data_cfg.seq_len, mem_freq=opts.get("mem_freq", 1),
                        landmark_id=opts.get("landmark_token_id", 0))
    inner_cfg = dataclasses.replace(
        data_cfg, seq_len=content_length(data_cfg.seq_len, self._insert["mem_freq"]))
    self._inner = build_inner(inner_cfg, _content_model_config(model_cfg), seed=seed)

  def _rows(self, batches):
    return (insert_landmarks(b, **self._insert) for b in batches)

  def train_batches(self):
    return self._rows(self._inner.train_batches())

  def eval_batches(self):
    return self._rows(self._inner.eval_batches())

  def __getattr__(self, name):  # unigram_entropy, train_state, restore_train, data_quality
    return getattr(self._inner, name)
