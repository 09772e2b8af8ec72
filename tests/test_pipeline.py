"""The grain pipeline (ctxjax/data/pipeline.py) and the "mixture" trainer source."""

import json
import os

import grain
import ml_collections
import numpy as np
import pytest

from ctxjax.data import corpus, packing, pipeline

SEQ, BATCH, BOS, EOS = 16, 6, 1, 2
N = 30  # batches of the reference run


def _docs(n=50, seed=0):
  """Random documents of 0..39 tokens from [4, 100) (bos/eos ids never occur inside)."""
  rng = np.random.default_rng(seed)
  return [rng.integers(4, 100, rng.integers(0, 40)).astype(np.int32) for _ in range(n)]


DOCS = _docs()


def _pipe(docs=DOCS, **kw):
  args = dict(seq_len=SEQ, batch_size=BATCH, bos_id=BOS, eos_id=EOS, seed=7)
  args.update(kw)
  return pipeline.PackedBatches(docs, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in packing.FIELDS)


@pytest.fixture(scope="module")
def reference_run():
  """The uninterrupted pipeline: 30 batches of 6 rows, 64 rows per epoch, so batch 10
  (rows 60..65) straddles epochs 0 and 1, and batch 21 (rows 126..131) epochs 1 and 2."""
  p = _pipe()
  assert p.rows.rows_per_epoch == 64
  return _take(p, N)


# -- packing -------------------------------------------------------------------

@pytest.mark.parametrize("bos", [BOS, None])
@pytest.mark.parametrize("positions", packing.POSITION_MODES)
def test_rows_equal_reference_packing_of_each_epoch_order(bos, positions):
  rows = pipeline.PackedRows(DOCS, seq_len=SEQ, bos_id=bos, eos_id=EOS, positions=positions,
                             seed=3, shuffle_rows=False)
  assert rows.skipped_empty == sum(len(d) == 0 for d in DOCS) > 0
  for epoch in (0, 1):
    order = rows.epoch_order(epoch)
    assert sorted(order) == [i for i, d in enumerate(DOCS) if len(d)]
    ref = list(packing.pack_documents((DOCS[i] for i in order), seq_len=SEQ, bos_id=bos,
                                      eos_id=EOS, positions=positions, drop_remainder=True))
    assert len(ref) == rows.rows_per_epoch
    for r, want in enumerate(ref):
      assert _same(rows[epoch * rows.rows_per_epoch + r], want), (epoch, r)


def test_segments_never_cross_documents_and_positions_restart(reference_run):
  for batch in reference_run:
    for inp, tgt, pos, seg, loss in zip(*(batch[k] for k in packing.FIELDS)):
      assert loss.all() and (seg >= 1).all()  # training rows are full
      for i in range(SEQ):
        starts = i == 0 or seg[i] != seg[i - 1]
        # A document starts (bos input) exactly where a segment starts at position 0.
        assert (inp[i] == BOS) == (pos[i] == 0)
        if inp[i] == BOS:
          assert starts
        if not starts:  # inside a segment: same document, next token, next position
          assert inp[i] == tgt[i - 1] and pos[i] == pos[i - 1] + 1
        if tgt[i] == EOS and i + 1 < SEQ:  # a document's end ends its segment
          assert seg[i + 1] == seg[i] + 1


def test_continuous_positions_and_doc_span():
  b = next(_pipe(positions="continuous"))
  np.testing.assert_array_equal(b["positions"], np.tile(np.arange(SEQ), (BATCH, 1)))
  ids = np.arange(10, 15, dtype=np.int32)  # d = [1, 10, 11, 12, 13, 14, 2]
  np.testing.assert_array_equal(pipeline.doc_span(ids, 1, 2, 0, 3), [1, 10, 11])
  np.testing.assert_array_equal(pipeline.doc_span(ids, 1, 2, 4, 7), [13, 14, 2])
  np.testing.assert_array_equal(pipeline.doc_span(ids, None, 2, 3, 6), [13, 14, 2])


# -- order ---------------------------------------------------------------------

def test_seed_determinism_and_a_new_order_every_epoch(reference_run):
  again = _take(_pipe(), 3)
  assert all(_same(a, b) for a, b in zip(again, reference_run))
  other = next(_pipe(seed=8))
  assert not np.array_equal(other["inputs"], reference_run[0]["inputs"])
  rows = _pipe().rows
  assert not np.array_equal(rows.epoch_order(0), rows.epoch_order(1))
  R = rows.rows_per_epoch
  # Row r of epoch 1 is not row r of epoch 0 (documents and rows reshuffled).
  assert sum(np.array_equal(rows[r]["inputs"], rows[R + r]["inputs"]) for r in range(R)) == 0
  # Each epoch packs every document once: its targets are the epoch order's [ids, eos]
  # stream less the final partial row (dropped, counted).
  assert rows.stats()["dropped_pairs_per_epoch"] == 1031 - R * SEQ
  for e in (0, 1):
    stream = np.concatenate([np.append(DOCS[i], EOS) for i in rows.epoch_order(e)])[:R * SEQ]
    got = np.concatenate([rows[e * R + r]["targets"] for r in range(R)])
    np.testing.assert_array_equal(np.sort(got), np.sort(stream))


# -- resume --------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 7, 10, 11, 21, 22])  # 10 and 21 straddle epochs
def test_stop_after_k_and_restore_yields_batches_k_plus_1_on(reference_run, k):
  first = _pipe()
  assert all(_same(a, b) for a, b in zip(_take(first, k), reference_run))
  state = json.loads(json.dumps(first.state))  # what the checkpoint stores
  assert state["batches"] == k
  resumed = _pipe()
  resumed.restore(state)
  rest = _take(resumed, N - k)
  assert all(_same(a, b) for a, b in zip(rest, reference_run[k:]))
  assert resumed.state["batches"] == N


@pytest.mark.parametrize("change, key", [
    (dict(seq_len=8), "data.seq_len"), (dict(seed=8), "data.shuffle_seed"),
    (dict(batch_size=12), "data.batch_size"), (dict(docs=_docs(seed=1)), "the documents")])
def test_state_from_other_settings_is_refused(change, key):
  state = _pipe().state
  with pytest.raises(ValueError, match=key):
    _pipe(**change).restore(state)


# -- processes -----------------------------------------------------------------

def _shards(count, **kw):
  return [_pipe(shard=grain.sharding.ShardOptions(i, count), **kw) for i in range(count)]


def test_processes_get_disjoint_blocks_whose_union_is_the_batch(reference_run):
  p0, p1 = _shards(2)
  assert p0.local_batch_size == p1.local_batch_size == BATCH // 2
  for want in reference_run[:12]:  # through the first epoch boundary
    b0, b1 = next(p0), next(p1)
    for key in packing.FIELDS:
      np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), want[key])
    for r0 in b0["inputs"]:  # disjoint: no row of one process is a row of the other
      assert not any(np.array_equal(r0, r1) for r1 in b1["inputs"])
  assert p0.state == p1.state  # one state for all processes


def test_state_resumes_on_another_process_count(reference_run):
  one = _pipe()
  _take(one, 9)
  shards = _shards(3)
  for s in shards:
    s.restore(one.state)
  got = [next(s) for s in shards]
  for key in packing.FIELDS:
    np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), reference_run[9][key])


def test_batch_size_must_divide_by_the_process_count():
  with pytest.raises(ValueError, match=r"data.batch_size=5 is not divisible by the 2"):
    _pipe(batch_size=5, shard=grain.sharding.ShardOptions(0, 2))


def test_bad_settings_name_the_config_key():
  with pytest.raises(ValueError, match="less than one row of data.seq_len=16"):
    _pipe(docs=[np.arange(4, 9, dtype=np.int32)])
  with pytest.raises(ValueError, match="data.packed_positions='bogus'; valid choices"):
    _pipe(positions="bogus")


# -- the trainer source --------------------------------------------------------

@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ctxjax_data"))
  corpus.atomic_build_dir(corpus.corpus_dir(d), lambda tmp: corpus.build_demo_corpus(
      tmp, max_docs_per_source=8, max_bytes_per_source=120_000))
  return d


def test_mixture_source_on_the_demo_corpus(demo_dir, tmp_path):
  from ctxjax.data import registry
  from ctxjax.data.config import data_config
  model = ml_collections.ConfigDict(dict(vocab_size=512))

  def cfg(**kw):
    c = dict(name="mixture", data_dir=demo_dir, tokenizer="", seq_len=32, batch_size=4,
             packed_positions="per_document", shuffle_seed=None,
             mixture=dict(kind="cut_long", short_threshold=64, target_context=96,
                          long_share=0.7, sources=()))
    c.update(kw)
    return data_config(ml_collections.ConfigDict(c))

  whole = registry.build(cfg(workdir=str(tmp_path)), model, seed=3)
  with open(tmp_path / "mixture_stats.json", encoding="utf-8") as f:
    stats = json.load(f)
  assert stats["kind"] == "cut_long" and stats["pipeline"]["rows_per_epoch"] > 0
  assert max(len(d) for d in whole.train_docs) <= 96  # cut at target_context
  halves = [registry.build(cfg(process_index=i, process_count=2), model, seed=3)
            for i in range(2)]
  batches = _take(whole.train_batches(), 3)
  for h in halves:
    h.restore_train(json.loads(json.dumps(whole.train_state())))
  got, want = [next(h.train_batches()) for h in halves], next(whole.train_batches())
  for key in packing.FIELDS:
    assert got[0][key].shape == (2, 32)
    np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
  assert batches[0]["inputs"].max() < 512
  ev = next(halves[1].eval_batches())
  assert ev["inputs"].shape == (2, 32)
  assert 0 < whole.unigram_entropy() < np.log(512)
