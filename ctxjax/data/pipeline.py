"""The resumable, per-process-sharded grain pipeline: token documents -> packed batches.

Input: a random-access sequence of token-id documents (int32 arrays, no bos/eos), e.g. the
output of a mixture (ctxjax/data/mixtures.py) or a tokenized tfds source. Output: an endless
iterator of this process's rows of each GLOBAL batch, dicts of numpy ``[batch_size //
process_count, seq_len]`` arrays with the fields of ctxjax/data/packing.py (inputs, targets,
positions, segment_ids, loss_mask).

Order (where shuffling happens). Epoch ``e`` permutes the documents with ``(seed, e)`` and packs
them, in that order, into rows of ``seq_len`` exactly as ``packing.pack_documents`` would
(document-aware: a segment never crosses into another document; positions restart at 0 per
document in ``per_document`` mode); Fu et al. (2024) likewise pack shuffled documents. The
epoch's rows are then permuted with ``(seed, e, 1)`` (``shuffle_rows``, default on): without
it consecutive rows, hence whole batches, come from one long document and the gradient noise
slows learning (the demo corpus showed it, ctxjax/data/demo.py). Each epoch packs on its own
and drops its final partial row (``stats()['dropped_pairs_per_epoch']``), so every epoch has
the same ``rows_per_epoch`` rows and global row ``g`` is row ``g % R`` of epoch ``g // R``.

Random access. Row ``g`` is computed from the document lengths alone (a per-epoch prefix sum,
binary search for its first document), so any row is O(seq_len) work: no pass over the
stream, no packing state to carry. Global batch ``k`` is rows ``[k B, (k+1) B)``; process
``p`` of ``P`` reads the ``p``-th block of ``B / P`` of them (the row block the trainer
places with ``jax.make_array_from_process_local_data``, ctxjax/train/sharding.py), so
processes get disjoint rows whose concatenation is the single-process batch.

grain: a ``MapDataset`` over this process's rows, ``.batch(B / P)``, ``.to_iter_dataset``
with a thread pool prefetching batches (``ReadOptions``; 2 threads fit a 2-core box).

State: ``{"batches": k, ...}`` with k = grain's ``next_index`` (batches consumed), plus the
settings that fix the stream (seq_len, batch_size, seed, ...). It is small, JSON-able, the same
on every process and independent of the process count, so the trainer checkpoints it with the
model (orbax) and a resumed run, even on another number of hosts, yields exactly batches
k+1, k+2, ...; a state written by other settings is refused, naming the key.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from ctxjax.data import packing
from ctxjax.registry import unknown_choice

STATE_VERSION = 1
# State keys that must match on restore -> the config key a user changes (for the message).
STATE_KEYS = {
    "seq_len": "data.seq_len",
    "batch_size": "data.batch_size",
    "seed": "data.shuffle_seed",
    "positions": "data.packed_positions",
    "shuffle_rows": "data.shuffle_rows",
    "bos_id": "data.tokenizer (bos id)",
    "eos_id": "data.tokenizer (eos id)",
    "pad_id": "data.tokenizer (pad id)",
    "documents": "the documents (data.jsonl / data.tfds_name / data.mixture)",
    "pairs_per_epoch": "the documents (data.jsonl / data.tfds_name / data.mixture)",
    "version": "the pipeline version (ctxjax/data/pipeline.py STATE_VERSION)",
}
_EPOCHS_CACHED = 3  # prefetch threads may straddle an epoch boundary


def doc_span(ids: np.ndarray, bos_id: int | None, eos_id: int, lo: int, hi: int) -> np.ndarray:
  """``d[lo:hi]`` of ``d = [bos, *ids, eos]`` (no bos when None) without building ``d``:
  a 128K-token document costs O(hi - lo) per row, not O(len)."""
  h, n = (0 if bos_id is None else 1), len(ids)
  out = np.empty(hi - lo, np.int32)
  if lo < h:
    out[0] = bos_id
  a, b = max(lo, h), min(hi, h + n)
  if b > a:
    out[a - lo:b - lo] = ids[a - h:b - h]
  if hi > h + n:
    out[h + n - lo] = eos_id
  return out


class _EpochLayout:
  """Epoch ``e``'s document order, prefix sums of its pairs, and its row permutation."""

  def __init__(self, pairs_N: np.ndarray, rows: int, seed: int, epoch: int, shuffle_rows: bool):
    self.order_N = np.random.default_rng([seed, epoch]).permutation(len(pairs_N))
    self.cum = np.zeros(len(pairs_N) + 1, np.int64)  # pair offset where each document starts
    np.cumsum(pairs_N[self.order_N], out=self.cum[1:])
    self.row_of = (np.random.default_rng([seed, epoch, 1]).permutation(rows) if shuffle_rows
                   else np.arange(rows))


class PackedRows:
  """Random access to the endless stream of packed rows (all processes); see the module doc."""

  def __init__(self, docs: Sequence[np.ndarray], *, seq_len: int, bos_id: int | None,
               eos_id: int, pad_id: int = 0, positions: str = "per_document", seed: int = 0,
               shuffle_rows: bool = True):
    if int(seq_len) < 1:
      raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    if positions not in packing.POSITION_MODES:
      raise ValueError(unknown_choice("data.packed_positions", positions,
                                      packing.POSITION_MODES))
    self.seq_len, self.positions = int(seq_len), positions
    self.bos_id, self.eos_id, self.pad_id = bos_id, int(eos_id), int(pad_id)
    self.seed, self.shuffle_rows = int(seed), bool(shuffle_rows)
    lengths = np.fromiter((len(d) for d in docs), np.int64, count=len(docs))
    # Empty documents hold no text (with bos, only a bos -> eos pair): skipped and counted.
    keep = np.flatnonzero(lengths > 0)
    self.skipped_empty = int(len(docs) - len(keep))
    self._docs = docs
    self._doc_index = keep
    self.pairs_N = lengths[keep] + (0 if bos_id is None else 1)  # next-token pairs per doc
    self.pairs_per_epoch = int(self.pairs_N.sum())
    self.rows_per_epoch = self.pairs_per_epoch // self.seq_len
    if self.rows_per_epoch == 0:
      raise ValueError(f"{len(keep)} non-empty documents hold {self.pairs_per_epoch} token "
                       f"pairs, less than one row of data.seq_len={self.seq_len}")
    self._layouts: collections.OrderedDict[int, _EpochLayout] = collections.OrderedDict()
    self._lock = threading.Lock()

  def layout(self, epoch: int) -> _EpochLayout:
    with self._lock:  # grain's prefetch threads share this cache
      lay = self._layouts.get(epoch)
      if lay is None:
        lay = _EpochLayout(self.pairs_N, self.rows_per_epoch, self.seed, epoch,
                           self.shuffle_rows)
        self._layouts[epoch] = lay
        while len(self._layouts) > _EPOCHS_CACHED:
          self._layouts.popitem(last=False)
      return lay

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Indices into ``docs`` in epoch ``epoch``'s packing order (empty documents left out)."""
    return self._doc_index[self.layout(epoch).order_N]

  def __getitem__(self, g: int) -> dict[str, np.ndarray]:
    epoch, r = divmod(int(g), self.rows_per_epoch)
    lay = self.layout(epoch)
    T = self.seq_len
    start = int(lay.row_of[r]) * T  # first pair of the row in the epoch's stream
    k = int(np.searchsorted(lay.cum, start, side="right")) - 1
    row = packing.empty_row(T, self.pad_id, self.positions)
    fill, seg = 0, 0
    while fill < T:
      off = start + fill - int(lay.cum[k])  # pair offset inside document k
      take = min(int(self.pairs_N[lay.order_N[k]]) - off, T - fill)
      ids = np.asarray(self._docs[self._doc_index[lay.order_N[k]]]).reshape(-1)
      d = doc_span(ids, self.bos_id, self.eos_id, off, off + take + 1)
      seg += 1
      sl = slice(fill, fill + take)
      row["inputs"][sl], row["targets"][sl] = d[:-1], d[1:]
      if self.positions == "per_document":
        row["positions"][sl] = np.arange(off, off + take, dtype=np.int32)
      row["segment_ids"][sl] = seg
      row["loss_mask"][sl] = 1.0
      fill += take
      k += 1
    return row

  def stats(self) -> dict[str, int]:
    return {"documents": len(self.pairs_N), "skipped_empty": self.skipped_empty,
            "pairs_per_epoch": self.pairs_per_epoch, "rows_per_epoch": self.rows_per_epoch,
            "dropped_pairs_per_epoch": self.pairs_per_epoch - self.rows_per_epoch * self.seq_len}


def shard_rows(batch_size: int, shard: grain.sharding.ShardOptions) -> int:
  """Rows per step for this process; the global batch must split evenly."""
  if int(batch_size) < 1:
    raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
  count, index = int(shard.shard_count), int(shard.shard_index)
  if not 0 <= index < count:
    raise ValueError(f"shard_index={index} outside [0, shard_count={count})")
  if batch_size % count:
    raise ValueError(f"data.batch_size={batch_size} is not divisible by the {count} "
                     f"processes feeding it (shard_count); use a multiple of {count}")
  return batch_size // count


class _ProcessRows:
  """This process's rows, in step order: local row i -> global row of its block."""

  def __init__(self, rows: PackedRows, batch_size: int, shard: grain.sharding.ShardOptions):
    self.rows, self.global_batch = rows, int(batch_size)
    self.local = shard_rows(batch_size, shard)
    self.first = int(shard.shard_index) * self.local

  def __len__(self) -> int:
    return 2**62  # endless; grain needs a length

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    step, j = divmod(int(i), self.local)
    return self.rows[step * self.global_batch + self.first + j]


class PackedBatches:
  """Endless iterator of this process's ``[batch_size // shard_count, seq_len]`` batches.

  ``docs``: random-access token-id documents (no bos/eos). ``batch_size`` is GLOBAL; ``shard``
  (``grain.sharding.ShardOptions``, e.g. ``ShardByJaxProcess()``; default one process) picks
  this process's row block.
  ``state`` / ``restore(state)``: see the module doc.
  """

  def __init__(self, docs: Sequence[np.ndarray], *, seq_len: int, batch_size: int,
               bos_id: int | None, eos_id: int, pad_id: int = 0,
               positions: str = "per_document", seed: int = 0, shuffle_rows: bool = True,
               shard: grain.sharding.ShardOptions | None = None, num_threads: int = 2,
               prefetch_batches: int = 4):
    self.shard = shard or grain.sharding.NoSharding()
    self.rows = PackedRows(docs, seq_len=seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                           positions=positions, seed=seed, shuffle_rows=shuffle_rows)
    self.batch_size = int(batch_size)
    local = _ProcessRows(self.rows, self.batch_size, self.shard)
    self.local_batch_size = local.local
    self.dataset = grain.MapDataset.source(local).batch(self.local_batch_size,
                                                        batch_fn=packing.stack_rows)
    self._read = grain.ReadOptions(num_threads=int(num_threads),
                                   prefetch_buffer_size=int(prefetch_batches))
    self._it = None
    self._start = 0

  def _settings(self) -> dict[str, Any]:
    r = self.rows
    return {"version": STATE_VERSION, "seq_len": r.seq_len, "batch_size": self.batch_size,
            "seed": r.seed, "positions": r.positions, "shuffle_rows": r.shuffle_rows,
            "bos_id": r.bos_id, "eos_id": r.eos_id, "pad_id": r.pad_id,
            "documents": len(r.pairs_N), "pairs_per_epoch": r.pairs_per_epoch}

  def __iter__(self) -> "PackedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = iter(self.dataset.to_iter_dataset(self._read))
      if self._start:
        self._it.set_state({"next_index": self._start})
    return next(self._it)

  @property
  def batches_done(self) -> int:
    return self._start if self._it is None else int(self._it.get_state()["next_index"])

  @property
  def epoch(self) -> float:
    """Epochs consumed (fractional), from the global rows served."""
    return self.batches_done * self.batch_size / self.rows.rows_per_epoch

  @property
  def state(self) -> dict[str, Any]:
    """Where the next batch starts plus the settings that fix the stream (JSON-able)."""
    return {"batches": self.batches_done, **self._settings()}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues after batch ``state["batches"]``; refuses a state from other settings."""
    if "batches" not in state or int(state["batches"]) < 0:
      raise ValueError(f"data pipeline state needs 'batches' >= 0, got {dict(state)}")
    mine = self._settings()
    for key, value in mine.items():
      if key not in state:
        raise ValueError(f"data pipeline state lacks {key!r} ({STATE_KEYS[key]}); it was not "
                         f"written by this pipeline")
      if state[key] != value:
        raise ValueError(f"data pipeline state has {key}={state[key]!r} but this pipeline has "
                         f"{key}={value!r} (set by {STATE_KEYS[key]}): a state resumes only "
                         f"the stream that wrote it")
    self._start, self._it = int(state["batches"]), None
