"""The demo-corpus batch iterator and the trainer's "demo" data source.

``DemoData`` builds (once) the demo corpus and its sentencepiece tokenizer under
the data dir, tokenizes the corpus once (token ids cached as ``.npy`` next to
the corpus, keyed by vocab size and tokenizer fingerprint), and serves packed
batches (see ``ctxjax.data.packing``): dicts of numpy arrays ``inputs``,
``targets``, ``positions``, ``segment_ids`` (int32) and ``loss_mask``
(float32), each ``[batch_size, seq_len]``.

Splits: about 2% of each source's documents (at least one, when the source has
two or more) are held out as ``validation``. The split depends only on the
corpus, not on ``seed``. ``train`` shuffles its documents every epoch (order
from ``(seed, epoch)``) and runs forever; ``validation`` is one pass in corpus
order, its last batch filled with all-padding rows.

Resuming: ``state`` is ``{"epoch", "doc_index", "offset"}`` — the next batch
begins at pair ``offset`` of document ``doc_index`` of epoch ``epoch``'s
order; this is the whole carry, since batches hold only complete rows.
``restore(state)`` continues with exactly the batches an uninterrupted
iterator would have given.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np

from ctxjax.data import corpus as corpus_lib
from ctxjax.data import packing
from ctxjax.data import tokenizer as tokenizer_lib
from ctxjax.registry import unknown_choice

SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.02
_SPLIT_SEED = 20240215  # fixed: the held-out set does not move with the training seed
_STATE_KEYS = ("epoch", "doc_index", "offset")


def _atomic_save(path: str, arr: np.ndarray) -> None:
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, arr)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_or_tokenize(jsonl_path: str, tok: tokenizer_lib.Tokenizer
                     ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(ids int32 [N_tokens], offsets int64 [N_docs + 1], source per document).

  Token ids (without bos/eos) of document i are ``ids[offsets[i]:offsets[i+1]]``.
  Cached next to ``jsonl_path`` as ``tokens_v{V}_{fingerprint}{,.offsets}.npy``.
  """
  d = os.path.dirname(os.path.abspath(jsonl_path))
  stem = os.path.join(d, f"tokens_v{tok.vocab_size}_{tok.fingerprint()}")
  ids_path, off_path = stem + ".npy", stem + ".offsets.npy"
  texts, sources = [], []
  for text, source in corpus_lib.read_jsonl(jsonl_path):
    texts.append(text)
    sources.append(source)
  if os.path.isfile(ids_path) and os.path.isfile(off_path):
    ids, offsets = np.load(ids_path), np.load(off_path)
    if len(offsets) == len(texts) + 1 and offsets[-1] == len(ids):
      return ids, offsets, sources
  encoded = tok.encode_batch(texts)
  offsets = np.zeros(len(encoded) + 1, np.int64)
  offsets[1:] = np.cumsum([len(e) for e in encoded])
  ids = np.fromiter((i for e in encoded for i in e), dtype=np.int32, count=int(offsets[-1]))
  _atomic_save(off_path, offsets)
  _atomic_save(ids_path, ids)  # last: written ids mean a complete cache
  return ids, offsets, sources


def validation_documents(sources: list[str], fraction: float = VALIDATION_FRACTION) -> np.ndarray:
  """Sorted indices of held-out documents: ~``fraction`` of each source."""
  rng = np.random.default_rng(_SPLIT_SEED)
  names = sorted(set(sources))
  src = np.asarray([names.index(s) for s in sources]) if sources else np.zeros(0, int)
  held = []
  for k in range(len(names)):
    members = np.flatnonzero(src == k)
    if len(members) < 2:
      continue
    n_val = max(1, int(round(fraction * len(members))))
    held.append(rng.permutation(members)[:n_val])
  return np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)


class DemoData:
  """Packed ``[batch_size, seq_len]`` batches of the demo corpus; an iterator."""

  def __init__(
      self,
      seq_len: int,
      batch_size: int,
      *,
      vocab_size: int = 1024,
      seed: int = 0,
      data_dir: str | None = None,
      positions: str = "per_document",
      split: str = "train",
      shuffle_rows: bool | None = None,
  ):
    if split not in SPLITS:
      raise ValueError(unknown_choice("split", split, SPLITS))
    if positions not in packing.POSITION_MODES:
      raise ValueError(unknown_choice("positions", positions, packing.POSITION_MODES))
    if int(seq_len) < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.seq_len, self.batch_size = int(seq_len), int(batch_size)
    self.seed, self.split, self.positions = int(seed), split, positions
    self.vocab_size = int(vocab_size)
    self.data_dir = data_dir
    self.tokenizer = tokenizer_lib.ensure_demo_tokenizer(data_dir, self.vocab_size)
    self.jsonl_path = corpus_lib.ensure_demo_corpus(data_dir)
    self._ids, self._offsets, sources = load_or_tokenize(self.jsonl_path, self.tokenizer)
    self._check_ids()

    held = validation_documents(sources)
    is_val = np.zeros(len(sources), bool)
    is_val[held] = True
    self._train_documents = np.flatnonzero(~is_val)
    self.documents = np.flatnonzero(is_val) if split == "validation" else self._train_documents
    if len(self.documents) == 0:
      raise ValueError(f"the demo corpus at {self.jsonl_path} has no {split} documents")
    self.sources = [sources[i] for i in self.documents]
    # Training shuffles packed ROWS per epoch (not only documents): consecutive batches would
    # otherwise come from the same long document and the gradient noise slows learning.
    self.shuffle_rows = (split == "train") if shuffle_rows is None else bool(shuffle_rows)
    if self.shuffle_rows and split != "train":
      raise ValueError("shuffle_rows=True is only for split='train'")
    self._epoch_cache: tuple[int, dict[str, np.ndarray]] | None = None
    self._entropy: float | None = None
    self._state = self._initial_state()
    self._batches: Iterator[tuple[dict[str, np.ndarray], dict[str, int]]] | None = None

  # -- checks and statistics ------------------------------------------------

  def _check_ids(self) -> None:
    specials = [self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id]
    hi = max([int(self._ids.max()) if len(self._ids) else -1] + specials)
    lo = min([int(self._ids.min()) if len(self._ids) else 0] + specials)
    if hi >= self.vocab_size or lo < 0:
      raise ValueError(f"demo corpus token ids span [{lo}, {hi}], outside [0, vocab_size) "
                       f"with vocab_size={self.vocab_size} ({self.tokenizer!r})")

  def doc_ids(self, i: int) -> np.ndarray:
    """Token ids (no bos/eos) of corpus document ``i``."""
    return self._ids[self._offsets[i]:self._offsets[i + 1]]

  @property
  def num_documents(self) -> int:
    return len(self.documents)

  @property
  def num_tokens(self) -> int:
    """Target tokens in one pass over this split (document tokens + one eos each)."""
    lens = self._offsets[self.documents + 1] - self._offsets[self.documents]
    return int(lens.sum() + len(self.documents))

  def unigram_entropy(self) -> float:
    """Entropy (nats/token) of the unigram distribution of training targets.

    A model that has learned only token frequencies reaches this loss; targets
    are every document token plus its eos (bos is never a target).
    """
    if self._entropy is None:
      train = self._train_documents
      counts = np.zeros(self.vocab_size, np.int64)
      for i in train:
        counts += np.bincount(self.doc_ids(i), minlength=self.vocab_size)
      counts[self.tokenizer.eos_id] += len(train)
      p = counts[counts > 0] / counts.sum()
      self._entropy = float(-(p * np.log(p)).sum())
    return self._entropy

  # -- iteration -------------------------------------------------------------

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Corpus document indices of this split in the order of ``epoch``."""
    if self.split == "validation":
      return self.documents
    perm = np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.documents))
    return self.documents[perm]

  def _doc_stream(self, epoch: int, doc_index: int):
    e = epoch
    while True:
      order = self.epoch_order(e)
      for i in range(doc_index if e == epoch else 0, len(order)):
        yield (e, i), self.doc_ids(order[i])
      if self.split == "validation":
        return
      e += 1

  def _initial_state(self) -> dict[str, int]:
    if self.shuffle_rows:
      return {"epoch": 0, "row": 0}
    return {"epoch": 0, "doc_index": 0, "offset": 0}

  def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
    """Shuffled-rows mode: every full row packed from ``epoch``'s document order, permuted
    with (seed, epoch). Rows are [num_rows, seq_len] arrays; the last partial row is dropped."""
    if self._epoch_cache is None or self._epoch_cache[0] != epoch:
      tok = self.tokenizer
      rows = list(packing.pack_documents(
          (self.doc_ids(d) for d in self.epoch_order(epoch)), seq_len=self.seq_len,
          bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, positions=self.positions,
          drop_remainder=True))
      if len(rows) < self.batch_size:
        raise ValueError(f"the demo corpus packs into {len(rows)} rows of seq_len="
                         f"{self.seq_len}, fewer than batch_size={self.batch_size}")
      perm = np.random.default_rng([self.seed, int(epoch), 1]).permutation(len(rows))
      stacked = packing.stack_rows(rows)
      self._epoch_cache = (epoch, {k: v[perm] for k, v in stacked.items()})
    return self._epoch_cache[1]

  def _row_stream(self, state: Mapping[str, int]):
    epoch, row = state["epoch"], state["row"]
    while True:
      rows = self.epoch_rows(epoch)
      if row + self.batch_size > len(rows["inputs"]):  # drop the epoch's ragged tail
        epoch, row = epoch + 1, 0
        continue
      batch = {k: v[row:row + self.batch_size] for k, v in rows.items()}
      row += self.batch_size
      yield batch, {"epoch": epoch, "row": row}

  def _batch_stream(self, state: Mapping[str, int]):
    if self.shuffle_rows:
      yield from self._row_stream(state)
      return
    tok = self.tokenizer
    rows = packing.pack_with_cursor(
        self._doc_stream(state["epoch"], state["doc_index"]), seq_len=self.seq_len,
        bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
        positions=self.positions, start_offset=state["offset"])
    buf = []
    cursor = None
    for row, cursor in rows:
      buf.append(row)
      if len(buf) == self.batch_size:
        yield packing.stack_rows(buf), _state_of(cursor)
        buf = []
    if buf:  # validation's end: fill with all-padding rows
      buf += [packing.empty_row(self.seq_len, tok.pad_id, self.positions)
              for _ in range(self.batch_size - len(buf))]
      yield packing.stack_rows(buf), _state_of(cursor)

  def __iter__(self) -> "DemoData":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batches is None:
      self._batches = self._batch_stream(self._state)
    batch, self._state = next(self._batches)
    return batch

  @property
  def state(self) -> dict[str, int]:
    """Where the next batch starts: ``{"epoch", "row"}`` (shuffled rows) or
    ``{"epoch", "doc_index", "offset"}`` (document stream)."""
    return dict(self._state)

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from ``state`` (from ``.state``)."""
    if self.shuffle_rows:
      if set(state) != {"epoch", "row"} or int(state["epoch"]) < 0 or int(state["row"]) < 0:
        raise ValueError(f"DemoData (shuffled rows) state must be {{'epoch', 'row'}} >= 0, "
                         f"got {dict(state)}")
      self._state = {"epoch": int(state["epoch"]), "row": int(state["row"])}
      self._batches = None
      return
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
      raise ValueError(f"DemoData state lacks {missing}; expected keys {list(_STATE_KEYS)}")
    new = {k: int(state[k]) for k in _STATE_KEYS}
    if new["epoch"] < 0 or (self.split == "validation" and new["epoch"] != 0):
      raise ValueError(f"state epoch={new['epoch']} invalid for split {self.split!r}")
    if not 0 <= new["doc_index"] < len(self.documents):
      raise ValueError(f"state doc_index={new['doc_index']} outside [0, {len(self.documents)})")
    doc = self.epoch_order(new["epoch"])[new["doc_index"]]
    n_pairs = len(self.doc_ids(doc)) + 1
    if not 0 <= new["offset"] <= n_pairs:
      raise ValueError(f"state offset={new['offset']} outside [0, {n_pairs}]")
    self._state = new
    self._batches = None

  def reset(self) -> None:
    """Back to the first batch (e.g. before another validation pass)."""
    self.restore(self._initial_state())

  def __repr__(self) -> str:
    return (f"DemoData(split={self.split!r}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, vocab_size={self.vocab_size}, "
            f"documents={self.num_documents}, tokens={self.num_tokens})")


def _state_of(cursor) -> dict[str, int]:
  (epoch, doc_index), offset = cursor
  return {"epoch": int(epoch), "doc_index": int(doc_index), "offset": int(offset)}


class DemoSource:
  """`config.data.name = "demo"` (ctxjax/data/registry.py): DemoData's train and validation
  splits, each process keeping its row block of every global batch."""

  def __init__(self, data_cfg, model_cfg, seed: int):
    self._common = dict(seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size,
                        vocab_size=model_cfg.vocab_size, seed=seed,
                        data_dir=data_cfg.data_dir or None, positions=data_cfg.packed_positions)
    self._train = DemoData(split="train", **self._common)
    self._rows = data_cfg.process_rows()

  def train_batches(self):
    # Every process packs the same global batch (cheap for the demo corpus) and keeps its rows,
    # so the data state is the same on every process.
    return ({k: v[self._rows] for k, v in batch.items()} for batch in self._train)

  def eval_batches(self):
    return ({k: v[self._rows] for k, v in batch.items()}
            for batch in DemoData(split="validation", **self._common))

  def unigram_entropy(self) -> float:
    return float(self._train.unigram_entropy())

  def train_state(self) -> dict:
    return self._train.state

  def restore_train(self, state: dict) -> None:
    self._train.restore(state)
