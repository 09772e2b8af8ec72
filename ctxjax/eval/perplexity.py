"""Perplexity vs context length on held-out documents, per source.

Documents of one source are concatenated into one stream, each preceded by bos (the
separator; bos is never a target: the trainer never asks the model to predict it), so a
length L longer than most documents still gets full windows (as the PG-19 / proof-pile
protocols of Press et al. 2022 and Peng et al. 2023 evaluate long books). The stream's
(input, target) pairs are then scored by one of two protocols:

  nonoverlap  windows of L pairs, each scored from its start (positions 0..L-1): every
              target sees between 0 and L-1 tokens of context; a trailing part shorter than
              L is dropped.
  sliding     Hugging Face's "perplexity of fixed-length models" with stride S: windows of L
              pairs start every S pairs; the first window scores all its targets, each later
              one only its last S (those after the previous window's end), so every target is
              scored once with at least L-S tokens of context; the pairs after the last full
              window are dropped. stride = L is exactly `nonoverlap`.

A source with fewer than L pairs is skipped at that length (tokens 0, nll/ppl None).
`max_tokens` caps the scored targets per source and length (the first windows). One jit
compile per length: windows are batched into fixed [batch_size, L] arrays (missing rows
masked). With `pack_to=W`, every length shares one [batch_size, W] program instead: W // L
windows sit side by side in a row as separate segments (segment ids 1, 2, ..., positions
restarting at 0), so attention never crosses windows and each window is scored as alone
(the same sums up to float rounding; dynamic NTK reads max(position) + 1, unchanged).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from ctxjax.registry import Registry

# (tokens_BT, positions_BT, targets_BT, mask_BT[, segment_ids_BT]) -> summed NLL per row [B].
NllFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
PROTOCOLS: Registry[str] = Registry("protocol")
PROTOCOLS.add("nonoverlap", "non-overlapping windows of L tokens, each scored from its start")
PROTOCOLS.add("sliding", "sliding windows of L tokens with stride S (HF fixed-length models)")


def masked_nll(logits_BTV, targets_BT, mask_BT):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum(nll_BT * mask_BT, axis=-1)


def nll_fn_from_logits(logits_fn: Callable) -> NllFn:
  """A jitted NllFn from a traceable `logits_fn(tokens_BT, positions_BT) -> logits_BTV`."""
  from ctxjax import xla_options  # noqa: PLC0415
  fn = xla_options.jit(lambda t, p, y, m: masked_nll(logits_fn(t, p), y, m))
  return lambda t, p, y, m: np.asarray(fn(t, p, y, m), np.float64)


def nll_fn_from_model(model, variables) -> NllFn:
  """A jitted NllFn of a ctxjax Transformer (variables are an argument, not constants);
  it takes segment ids (default: one segment per row)."""
  from ctxjax import xla_options  # noqa: PLC0415
  fn = xla_options.jit(lambda v, t, p, y, m, s: masked_nll(model.apply(v, t, p, s), y, m))

  def nll(t, p, y, m, s=None):
    s = np.ones(np.shape(t), np.int32) if s is None else s
    return np.asarray(fn(variables, t, p, y, m, s), np.float64)
  return nll


def source_stream(docs: Sequence[np.ndarray], bos_id: int) -> np.ndarray:
  """[bos] d0 [bos] d1 ... as one int32 stream."""
  parts = [np.concatenate([[bos_id], np.asarray(d, np.int64)]) for d in docs if len(d)]
  return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def windows(num_pairs: int, length: int, stride: int | None = None
            ) -> list[tuple[int, int]]:
  """(start, first scored offset) of each window of `length` pairs; stride None = length
  (non-overlapping). Only full windows."""
  stride = length if stride is None else int(stride)
  if not 1 <= stride <= length:
    raise ValueError(f"stride={stride} must be in [1, length={length}]")
  out, prev_end, start = [], 0, 0
  while start + length <= num_pairs:
    out.append((start, prev_end - start))
    prev_end, start = start + length, start + stride
  return out


def stream_nll(nll_fn: NllFn, stream: np.ndarray, length: int, *, bos_id: int,
               stride: int | None = None, batch_size: int = 1,
               max_tokens: int | None = None, pack_to: int | None = None) -> tuple[float, int]:
  """(summed NLL, scored tokens) of `stream` under the protocol (stride None: nonoverlap);
  `pack_to`: rows of that width holding width // length windows each (module docstring)."""
  inputs, targets = stream[:-1], stream[1:]
  spans = windows(max(len(stream) - 1, 0), length, stride)
  width = length if pack_to is None else int(pack_to)
  if width < length:
    raise ValueError(f"pack_to={pack_to} is shorter than length={length}")
  per_row = width // length
  row_positions, row_segments = np.zeros(width, np.int32), np.zeros(width, np.int32)
  row_positions[:per_row * length] = np.tile(np.arange(length, dtype=np.int32), per_row)
  row_segments[:per_row * length] = np.repeat(np.arange(1, per_row + 1, dtype=np.int32), length)
  positions = np.broadcast_to(row_positions, (batch_size, width))
  segments = np.broadcast_to(row_segments, (batch_size, width))
  rows_t, rows_y, rows_m, total, count = [], [], [], 0.0, 0

  def flush():
    nonlocal total
    def stack(rows, dtype):
      out = np.zeros((batch_size * per_row, length), dtype)
      out[:len(rows)] = rows
      out = out.reshape(batch_size, per_row * length)
      return np.pad(out, ((0, 0), (0, width - per_row * length)))
    t, y, m = (stack(rows_t, np.int32), stack(rows_y, np.int32),
               stack(rows_m, np.float32))
    args = (t, positions, y, m) + ((segments,) if pack_to is not None else ())
    total += float(nll_fn(*args).sum())  # padding rows / windows are masked: they add 0
    rows_t.clear(), rows_y.clear(), rows_m.clear()

  for start, first in spans:
    y = targets[start:start + length]
    m = (np.arange(length) >= first) & (y != bos_id)
    if max_tokens is not None:
      budget = max_tokens - count
      if budget <= 0:
        break
      m &= np.cumsum(m) <= budget
    rows_t.append(inputs[start:start + length])
    rows_y.append(y)
    rows_m.append(m.astype(np.float32))
    count += int(m.sum())
    if len(rows_t) == batch_size * per_row:
      flush()
  if rows_t:
    flush()
  return total, count


def _entry(nll: float, tokens: int) -> dict:
  if not tokens:
    return {"nll": None, "ppl": None, "tokens": 0}
  mean = nll / tokens
  return {"nll": mean, "ppl": math.exp(mean), "tokens": tokens}


def default_lengths(train_length: int,
                    factors: Sequence[float] = (0.5, 1, 2, 4, 8, 16)) -> list[int]:
  return [max(1, int(f * train_length)) for f in factors]


def perplexity_vs_length(nll_fn: NllFn, docs_by_source: Mapping[str, Sequence[np.ndarray]],
                         lengths: Sequence[int], *, bos_id: int, protocol: str = "nonoverlap",
                         stride: int | None = None, batch_size: int = 1,
                         batch_tokens: int | None = None, max_tokens: int | None = None,
                         model: str = "", progress: Callable | None = None,
                         pack_to: int | None = None) -> dict:
  """{model, protocol, stride, lengths, per_source: {src: {L: {nll, ppl, tokens}}},
  overall: {L: ...}}; nll is the mean per scored token (nats), ppl = exp(nll). With
  `batch_tokens`, each length's batch holds max(1, batch_tokens // L) windows (rows of
  `pack_to` tokens with `pack_to`: one compiled program for every length)."""
  PROTOCOLS.check(protocol)
  streams = {src: source_stream(docs, bos_id) for src, docs in docs_by_source.items()}
  per_source: dict = {src: {} for src in streams}
  overall = {}
  for length in lengths:
    length = int(length)
    s = (stride or max(1, length // 2)) if protocol == "sliding" else None
    sums, counts = 0.0, 0
    for src, stream in streams.items():
      row = pack_to or length
      nll, n = stream_nll(nll_fn, stream, length, bos_id=bos_id, stride=s,
                          batch_size=max(1, batch_tokens // row) if batch_tokens
                          else batch_size, max_tokens=max_tokens, pack_to=pack_to)
      per_source[src][str(length)] = _entry(nll, n)
      sums, counts = sums + nll, counts + n
      if progress is not None:
        progress()
    overall[str(length)] = _entry(sums, counts)
  if protocol == "sliding" and not stride:
    stride = "length // 2"
  return {"model": model, "protocol": protocol, "stride": stride,
          "lengths": [int(x) for x in lengths], "per_source": per_source, "overall": overall}
