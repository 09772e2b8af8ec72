"""Packing tokenized documents into fixed-length rows with segment ids and positions.

Each document's ids become ``d = [bos, t1, ..., tn, eos]`` and contribute the
next-token pairs ``(d[:-1], d[1:])`` — n + 1 pairs, so a target never belongs
to another document. Pairs are laid greedily into rows of exactly ``seq_len``.
A document that does not fit in the space left in a row is split: the rest
continues as a new segment at the start of the next row.

Row fields (numpy, one row = ``[seq_len]``):
  inputs       int32   token ids fed to the model
  targets      int32   the token that follows each input in its document
  positions    int32   ``per_document``: offset of the input token within its
                       document (continued across a split, so positions are
                       the true token offsets); ``continuous``: 0..seq_len-1
  segment_ids  int32   1, 2, ... per document piece within the row; 0 = padding
  loss_mask    float32 1 on real pairs, 0 on padding
Only the stream's final, partial row is padded (``pad_id``, position 0 in
``per_document`` mode, segment 0, loss 0); ``drop_remainder=True`` drops it.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable, Iterator, Sequence

import numpy as np

from ctxjax.registry import unknown_choice

POSITION_MODES = ("per_document", "continuous")
FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
REMAINDER_MODES = ("pad", "drop", "keep")


def _check_args(seq_len: int, positions: str) -> None:
  if int(seq_len) < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  if positions not in POSITION_MODES:
    raise ValueError(unknown_choice("positions", positions, POSITION_MODES))


def empty_row(seq_len: int, pad_id: int = 0,
              positions: str = "per_document") -> dict[str, np.ndarray]:
  """An all-padding row."""
  pos = (np.arange(seq_len, dtype=np.int32) if positions == "continuous"
         else np.zeros(seq_len, np.int32))
  return {
      "inputs": np.full(seq_len, pad_id, np.int32),
      "targets": np.full(seq_len, pad_id, np.int32),
      "positions": pos,
      "segment_ids": np.zeros(seq_len, np.int32),
      "loss_mask": np.zeros(seq_len, np.float32),
  }


def document_tokens(ids: Sequence[int] | np.ndarray, bos_id: int | None, eos_id: int) -> np.ndarray:
  """``[bos, *ids, eos]`` as int32 (no bos when ``bos_id`` is None)."""
  ids = np.asarray(ids, dtype=np.int32).reshape(-1)
  head = [] if bos_id is None else [bos_id]
  return np.concatenate([np.asarray(head, np.int32), ids, np.asarray([eos_id], np.int32)])


def pack_with_cursor(
    docs: Iterable[tuple[Hashable, Sequence[int] | np.ndarray]],
    *,
    seq_len: int,
    bos_id: int | None,
    eos_id: int,
    pad_id: int = 0,
    positions: str = "per_document",
    start_offset: int = 0,
    drop_remainder: bool = False,
) -> Iterator[tuple[dict[str, np.ndarray], tuple[Hashable, int]]]:
  """Like ``pack_documents`` over ``(key, ids)`` pairs, also yielding a resume cursor.

  Each row comes with ``(key, offset)``: the next row starts at pair ``offset``
  of document ``key`` (``offset`` may equal that document's pair count, i.e.
  the next row starts with the following document). Re-running with the
  stream restarted at document ``key`` and ``start_offset=offset`` yields
  exactly the rows that follow. ``start_offset`` applies to the first document.
  """
  _check_args(seq_len, positions)
  T = int(seq_len)
  per_doc = positions == "per_document"
  row = empty_row(T, pad_id, positions)
  fill, seg = 0, 0
  key, off, n = None, 0, 0
  for di, (key, ids) in enumerate(docs):
    d = document_tokens(ids, bos_id, eos_id)
    n = len(d) - 1  # number of (input, target) pairs
    off = int(start_offset) if di == 0 else 0
    if not 0 <= off <= n:
      raise ValueError(f"start_offset={start_offset} outside [0, {n}] for document {key!r}")
    while off < n:
      take = min(n - off, T - fill)
      seg += 1
      sl = slice(fill, fill + take)
      row["inputs"][sl] = d[off:off + take]
      row["targets"][sl] = d[off + 1:off + 1 + take]
      if per_doc:
        row["positions"][sl] = np.arange(off, off + take, dtype=np.int32)
      row["segment_ids"][sl] = seg
      row["loss_mask"][sl] = 1.0
      off += take
      fill += take
      if fill == T:
        yield row, (key, off)
        row = empty_row(T, pad_id, positions)
        fill, seg = 0, 0
  if fill and not drop_remainder:
    yield row, (key, off)


def pack_documents(
    docs_iter: Iterable[Sequence[int] | np.ndarray],
    *,
    seq_len: int,
    bos_id: int | None,
    eos_id: int,
    pad_id: int = 0,
    positions: str = "per_document",
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Packs token-id documents (without bos/eos) into rows; see the module docstring."""
  _check_args(seq_len, positions)
  for row, _ in pack_with_cursor(
      enumerate(docs_iter), seq_len=seq_len, bos_id=bos_id, eos_id=eos_id,
      pad_id=pad_id, positions=positions, drop_remainder=drop_remainder):
    yield row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in FIELDS}


def batch_rows(
    rows_iter: Iterable[dict[str, Any]],
    batch_size: int,
    *,
    remainder: str = "pad",
    pad_id: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Stacks rows into ``[batch_size, seq_len]`` batches.

  The final partial batch is filled with all-padding rows (``remainder="pad"``,
  keeps shapes static for ``jit``), dropped (``"drop"``) or yielded short
  (``"keep"``).
  """
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if remainder not in REMAINDER_MODES:
    raise ValueError(unknown_choice("remainder", remainder, REMAINDER_MODES))
  buf: list[dict[str, np.ndarray]] = []
  for row in rows_iter:
    buf.append(row)
    if len(buf) == batch_size:
      yield stack_rows(buf)
      buf = []
  if buf and remainder != "drop":
    if remainder == "pad":
      T = len(buf[0]["inputs"])
      buf += [empty_row(T, pad_id) for _ in range(batch_size - len(buf))]
    yield stack_rows(buf)
