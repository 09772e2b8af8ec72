"""Exact tests of ctxjax.data.packing on hand-made documents."""

import numpy as np
import pytest

from ctxjax.data import packing

BOS, EOS, PAD = 1, 2, 0
# A: 3 pairs, B: 2 pairs, C: 7 pairs, D: 2 pairs; seq_len 4 -> 3 full rows + 1 partial.
DOCS = [[10, 11], [20], [30, 31, 32, 33, 34, 35], [40]]

EXPECTED = {
    "inputs": [[1, 10, 11, 1], [20, 1, 30, 31], [32, 33, 34, 35], [1, 40, 0, 0]],
    "targets": [[10, 11, 2, 20], [2, 30, 31, 32], [33, 34, 35, 2], [40, 2, 0, 0]],
    "segment_ids": [[1, 1, 1, 2], [1, 2, 2, 2], [1, 1, 1, 1], [1, 1, 0, 0]],
    "loss_mask": [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]],
}
PER_DOC_POSITIONS = [[0, 1, 2, 0], [1, 0, 1, 2], [3, 4, 5, 6], [0, 1, 0, 0]]
DTYPES = {"inputs": np.int32, "targets": np.int32, "positions": np.int32,
          "segment_ids": np.int32, "loss_mask": np.float32}


def _pack(docs, **kw):
  kw = {"seq_len": 4, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD, **kw}
  return list(packing.pack_documents(iter(docs), **kw))


def _assert_rows(rows, expected):
  assert len(rows) == len(expected["inputs"])
  for r, row in enumerate(rows):
    assert set(row) == set(packing.FIELDS)
    for k in packing.FIELDS:
      assert row[k].dtype == DTYPES[k], k
      np.testing.assert_array_equal(row[k], np.asarray(expected[k][r], DTYPES[k]),
                                    err_msg=f"row {r} field {k}")


def test_per_document_positions_exact():
  rows = _pack(DOCS, positions="per_document")
  _assert_rows(rows, {**EXPECTED, "positions": PER_DOC_POSITIONS})


def test_continuous_positions_exact():
  rows = _pack(DOCS, positions="continuous")
  _assert_rows(rows, {**EXPECTED, "positions": [[0, 1, 2, 3]] * 4})


def test_drop_remainder_drops_only_the_partial_row():
  rows = _pack(DOCS, drop_remainder=True)
  trimmed = {k: v[:3] for k, v in {**EXPECTED, "positions": PER_DOC_POSITIONS}.items()}
  _assert_rows(rows, trimmed)


def test_long_document_split_continues_positions():
  doc = list(range(100, 110))  # 10 tokens -> 11 pairs
  rows = _pack([doc], positions="per_document")
  d = [BOS] + doc + [EOS]
  _assert_rows(rows, {
      "inputs": [d[0:4], d[4:8], d[8:11] + [PAD]],
      "targets": [d[1:5], d[5:9], d[9:12] + [PAD]],
      "positions": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]],
      "segment_ids": [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]],
      "loss_mask": [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]],
  })


def test_empty_document_and_no_bos():
  rows = _pack([[], [5]], seq_len=3)
  _assert_rows(rows, {
      "inputs": [[1, 1, 5]], "targets": [[2, 5, 2]], "positions": [[0, 0, 1]],
      "segment_ids": [[1, 2, 2]], "loss_mask": [[1, 1, 1]]})
  rows = _pack([[], [5, 6]], seq_len=3, bos_id=None)  # empty doc has no pair
  _assert_rows(rows, {
      "inputs": [[5, 6, 0]], "targets": [[6, 2, 0]], "positions": [[0, 1, 0]],
      "segment_ids": [[1, 1, 0]], "loss_mask": [[1, 1, 0]]})


@pytest.mark.parametrize("positions", packing.POSITION_MODES)
@pytest.mark.parametrize("seq_len", [1, 3, 7, 16])
def test_no_target_crosses_a_document(positions, seq_len):
  """Rebuild every document from the rows' segments: pairs must be exactly (d[:-1], d[1:])."""
  rng = np.random.default_rng(seq_len)
  # Document k's own tokens lie in [1000k + 10, 1000k + 999]: any mix-up is visible.
  docs = [list(1000 * k + 10 + rng.integers(0, 990, size=rng.integers(0, 25)))
          for k in range(1, 40)]
  rows = _pack(docs, seq_len=seq_len, positions=positions)
  pieces = []  # (inputs, targets, positions) per segment, in stream order
  for row in rows:
    seg = row["segment_ids"]
    n_real = int((seg > 0).sum())
    assert np.all(seg[n_real:] == 0)  # padding only at the end of a row
    np.testing.assert_array_equal(np.unique(seg[:n_real]), np.arange(1, seg.max() + 1))
    assert np.all(np.diff(seg[:n_real]) >= 0)  # segments are contiguous and increasing
    assert np.all((seg > 0) == (row["loss_mask"] > 0))
    # padding only in the final row, only at its end
    if row is not rows[-1]:
      assert np.all(seg > 0)
    for s in range(1, seg.max() + 1):
      m = seg == s
      assert m.any()
      pieces.append((row["inputs"][m], row["targets"][m], row["positions"][m]))
      if positions == "continuous":
        np.testing.assert_array_equal(row["positions"], np.arange(seq_len))
    np.testing.assert_array_equal(row["inputs"][seg == 0], PAD)
    np.testing.assert_array_equal(row["targets"][seg == 0], PAD)
  # Glue pieces back into documents: a new document starts with input == BOS.
  rebuilt = []
  for inp, tgt, pos in pieces:
    if inp[0] == BOS and (not rebuilt or rebuilt[-1][1][-1] == EOS):
      rebuilt.append([list(inp), list(tgt), list(pos)])
    else:  # continuation of a split document
      assert rebuilt[-1][1][-1] != EOS
      rebuilt[-1][0] += list(inp)
      rebuilt[-1][1] += list(tgt)
      rebuilt[-1][2] += list(pos)
  assert len(rebuilt) == len(docs)
  for doc, (inp, tgt, pos) in zip(docs, rebuilt):
    d = [BOS] + doc + [EOS]
    assert inp == d[:-1] and tgt == d[1:]
    if positions == "per_document":
      assert pos == list(range(len(d) - 1))


def test_cursor_resumes_exactly():
  docs = [list(range(100 * k, 100 * k + n)) for k, n in enumerate([5, 0, 13, 2, 9, 1, 30, 4])]
  kw = dict(seq_len=6, bos_id=BOS, eos_id=EOS)
  full = list(packing.pack_with_cursor(enumerate(docs), **kw))
  for cut in range(len(full)):
    key, off = full[cut][1]
    rest = list(packing.pack_with_cursor(
        ((k, docs[k]) for k in range(key, len(docs))), start_offset=off, **kw))
    assert len(rest) == len(full) - cut - 1
    for (a, ca), (b, cb) in zip(rest, full[cut + 1:]):
      assert ca == cb
      for f in packing.FIELDS:
        np.testing.assert_array_equal(a[f], b[f])


def test_batch_rows_stacks_and_pads():
  rows = _pack(DOCS)  # 4 rows
  batches = list(packing.batch_rows(iter(rows), 3))
  assert len(batches) == 2
  for k in packing.FIELDS:
    np.testing.assert_array_equal(batches[0][k], np.stack([r[k] for r in rows[:3]]))
    assert batches[0][k].dtype == DTYPES[k] and batches[1][k].shape == (3, 4)
    np.testing.assert_array_equal(batches[1][k][0], rows[3][k])
    np.testing.assert_array_equal(batches[1][k][1:], 0)  # all-padding rows
  kept = packing.batch_rows(iter(rows), 3, remainder="keep")
  assert [b["inputs"].shape[0] for b in kept] == [3, 1]
  assert len(list(packing.batch_rows(iter(rows), 3, remainder="drop"))) == 1


def test_bad_arguments_name_the_choice():
  with pytest.raises(ValueError, match=r"valid choices: \['continuous', 'per_document'\]"):
    _pack(DOCS, positions="absolute")
  with pytest.raises(ValueError, match="seq_len"):
    _pack(DOCS, seq_len=0)
  with pytest.raises(ValueError, match=r"valid choices: \['drop', 'keep', 'pad'\]"):
    list(packing.batch_rows(iter([]), 2, remainder="trim"))
