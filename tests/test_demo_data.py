"""Demo corpus, tokenizer and DemoData iterator, on a small corpus built in a tmp data dir."""

import json
import math
import os

import numpy as np
import pytest

from ctxjax.data import corpus, demo, packing, tokenizer

VOCAB = 512
SEQ, BATCH = 64, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ctxjax_data"))
  corpus.atomic_build_dir(corpus.corpus_dir(d), lambda tmp: corpus.build_demo_corpus(
      tmp, max_docs_per_source=24, max_bytes_per_source=400_000))
  return d


@pytest.fixture(scope="module")
def docs(data_dir):
  return list(corpus.read_jsonl(corpus.ensure_demo_corpus(data_dir)))


@pytest.fixture(scope="module")
def tok(data_dir):
  return tokenizer.ensure_demo_tokenizer(data_dir, VOCAB)


def _equal_batches(a, b):
  assert set(a) == set(b) == set(packing.FIELDS)
  return all(np.array_equal(a[k], b[k]) for k in packing.FIELDS)


# -- corpus ------------------------------------------------------------------

def test_corpus_has_short_and_long_documents_per_source(docs):
  by_source = {}
  for text, source in docs:
    by_source.setdefault(source, []).append(len(text))
  varied = [s for s, lens in by_source.items() if min(lens) < 1_000 and max(lens) > 20_000]
  assert len(varied) >= 2, {s: (min(v), max(v), len(v)) for s, v in by_source.items()}
  assert all(text.strip() for text, _ in docs)


def test_jsonl_shape_and_stats_match(data_dir, docs):
  cdir = corpus.corpus_dir(data_dir)
  with open(os.path.join(cdir, corpus.JSONL_NAME), encoding="utf-8") as f:
    for line in f:
      obj = json.loads(line)
      assert set(obj) == {"text", "meta"} and set(obj["meta"]) == {"redpajama_set_name"}
  with open(os.path.join(cdir, corpus.STATS_NAME)) as f:
    stats = json.load(f)
  assert set(stats["sources"]) == {s for _, s in docs}
  for name, st in stats["sources"].items():
    texts = [t for t, s in docs if s == name]
    assert st["documents"] == len(texts) <= 24
    assert st["characters"] == sum(len(t) for t in texts)
    assert st["bytes"] == sum(len(t.encode("utf-8")) for t in texts) <= 400_000
    assert st["min_chars"] == min(len(t) for t in texts)
    assert st["max_chars"] == max(len(t) for t in texts)
    assert st["length_histogram_chars"] == corpus._histogram([len(t) for t in texts])
    assert sum(st["length_histogram_chars"].values()) == len(texts)
  assert stats["total"]["documents"] == len(docs)
  assert stats["total"]["characters"] == sum(len(t) for t, _ in docs)
  # sources in order, documents within a source in (sorted) file order: deterministic rebuild
  assert [s for _, s in docs] == sorted((s for _, s in docs), key=list(stats["sources"]).index)


def test_build_is_deterministic_and_counts_odd_files(tmp_path, data_dir):
  src = tmp_path / "src"
  src.mkdir()
  (src / "a.txt").write_bytes(b"caf\xe9 latin-1 bytes\n")
  (src / "b.txt").write_bytes(b"")
  (src / "c.txt").write_bytes(b" \n\t\n")
  (src / "d.txt").write_bytes("d\u00e9j\u00e0 vu\n".encode())
  (src / "e.txt").write_bytes("d\u00e9j\u00e0 vu\n".encode())  # duplicate of d
  sources = {"odd": [str(src / "*.txt")], "absent": ["/nonexistent-ctxjax/**/*.txt"]}
  stats = corpus.build_demo_corpus(str(tmp_path / "out"), sources=sources)
  st = stats["sources"]["odd"]
  counts = (st["documents"], st["skipped_empty"], st["replaced_non_utf8"], st["duplicates"])
  assert counts == (2, 2, 1, 1)
  assert stats["missing_sources"] == {"absent": ["/nonexistent-ctxjax/**/*.txt"]}
  texts = [t for t, _ in corpus.read_jsonl(str(tmp_path / "out" / corpus.JSONL_NAME))]
  assert texts == ["caf\ufffd latin-1 bytes\n", "d\u00e9j\u00e0 vu\n"]
  with pytest.raises(ValueError, match="no demo corpus source"):
    corpus.build_demo_corpus(str(tmp_path / "none"), sources={"absent": sources["absent"]})
  # the real sources rebuild byte-identically
  corpus.build_demo_corpus(str(tmp_path / "again"), max_docs_per_source=24,
                           max_bytes_per_source=400_000)
  for name in (corpus.JSONL_NAME, corpus.STATS_NAME):
    with open(os.path.join(corpus.corpus_dir(data_dir), name), "rb") as a, \
        open(tmp_path / "again" / name, "rb") as b:
      assert a.read() == b.read(), name


def test_ensure_is_idempotent_and_leaves_no_tmp(data_dir, monkeypatch):
  path = corpus.ensure_demo_corpus(data_dir)
  mtime = os.path.getmtime(path)
  monkeypatch.setenv("CTXJAX_DATA_DIR", data_dir)
  assert corpus.default_data_dir() == os.path.abspath(data_dir)
  assert corpus.ensure_demo_corpus() == path and os.path.getmtime(path) == mtime
  assert not [n for n in os.listdir(data_dir) if n.startswith(".tmp")]


def test_cli_builds_and_prints(tmp_path, capsys):
  rc = corpus.main([f"--out={tmp_path}", "--max_docs_per_source=3",
                    "--max_bytes_per_source=50000"])
  out = capsys.readouterr().out
  assert rc == 0 and "total" in out and os.path.isfile(tmp_path / corpus.JSONL_NAME)


# -- tokenizer ---------------------------------------------------------------

def test_tokenizer_round_trips(tok, docs, data_dir):
  assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (VOCAB, 0, 1, 2, 3)
  samples = [docs[0][0][:3000], docs[-1][0][:3000],
             "def f(x):\n\treturn  x ** 2  # два\r\n\n    ☃ 𝔘 \x00 end  "]
  for text in samples:
    ids = tok.encode(text)
    assert ids and all(0 <= i < VOCAB for i in ids) and tok.unk_id not in ids
    assert tok.decode(ids) == text
  again = tokenizer.load_tokenizer(tokenizer.demo_tokenizer_path(data_dir, VOCAB))
  assert again.encode(samples[2]) == tok.encode(samples[2])
  assert again.fingerprint() == tok.fingerprint()
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer.train_tokenizer("unused.jsonl", "unused", vocab_size=100)


# -- DemoData ----------------------------------------------------------------

@pytest.fixture(scope="module")
def train(data_dir, tok):
  return demo.DemoData(SEQ, BATCH, vocab_size=VOCAB, seed=3, data_dir=data_dir, shuffle_rows=False)


def test_batches_are_packed_epoch_order(train):
  train.reset()
  batches = [next(train) for _ in range(3)]
  order = train.epoch_order(0)
  expected_rows = packing.pack_documents(
      (train.doc_ids(i) for i in order), seq_len=SEQ, bos_id=2, eos_id=3)
  expected = list(packing.batch_rows(expected_rows, BATCH))[:3]
  for got, want in zip(batches, expected):
    for k in packing.FIELDS:
      assert got[k].shape == (BATCH, SEQ)
      assert got[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
    assert _equal_batches(got, want)
  text = train.tokenizer.decode(batches[0]["inputs"][0][1:])
  assert text and train.tokenizer.decode(train.doc_ids(order[0])).startswith(text)


def test_deterministic_for_a_seed(data_dir, train):
  train.reset()
  a = [next(train) for _ in range(4)]
  b_iter = demo.DemoData(SEQ, BATCH, vocab_size=VOCAB, seed=3, data_dir=data_dir, shuffle_rows=False)
  assert all(_equal_batches(x, next(b_iter)) for x in a)
  other = demo.DemoData(SEQ, BATCH, vocab_size=VOCAB, seed=4, data_dir=data_dir,
                        shuffle_rows=False)
  assert not _equal_batches(a[0], next(other))


def test_validation_is_disjoint_and_one_pass(data_dir, train):
  val = demo.DemoData(SEQ, BATCH, vocab_size=VOCAB, data_dir=data_dir, split="validation")
  tr, va = set(train.documents.tolist()), set(val.documents.tolist())
  assert va and not tr & va
  assert tr | va == set(range(len(train._offsets) - 1))
  assert len(va) == len({s for s in val.sources})  # one per source at this size
  batches = list(val)
  assert sum(float(b["loss_mask"].sum()) for b in batches) == val.num_tokens
  assert list(val) == []  # exhausted until reset
  val.reset()
  assert _equal_batches(next(val), batches[0])
  # validation tokens are exactly the held-out documents, in corpus order
  tgt = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
  want = np.concatenate([np.append(val.doc_ids(i), 3) for i in val.documents])
  np.testing.assert_array_equal(tgt, want)


@pytest.mark.parametrize("shuffle_rows", [False, True])
def test_restore_continues_exactly_across_epochs(data_dir, shuffle_rows):
  big = dict(vocab_size=VOCAB, seed=1, data_dir=data_dir, shuffle_rows=shuffle_rows)
  ref = demo.DemoData(512, 32, **big)
  states, batches = [], []
  while True:  # run past the first epoch boundary
    states.append(ref.state)
    batches.append(next(ref))
    if ref.state["epoch"] == 1 and len(batches) > 3:
      break
  assert states[0] == ({"epoch": 0, "row": 0} if shuffle_rows else
                       {"epoch": 0, "doc_index": 0, "offset": 0})
  for cut in (1, len(batches) - 3, len(batches) - 2):
    resumed = demo.DemoData(512, 32, **big)
    resumed.restore(json.loads(json.dumps(states[cut])))  # a plain-JSON round trip
    for want in batches[cut:]:
      assert _equal_batches(next(resumed), want)
  with pytest.raises(ValueError, match="row" if shuffle_rows else "doc_index"):
    ref.restore({"epoch": 0, "doc_index": 10**6, "offset": 0})


def test_shuffled_rows_are_a_permutation_of_the_packed_epoch(data_dir):
  shuffled = demo.DemoData(SEQ, BATCH, vocab_size=VOCAB, seed=5, data_dir=data_dir)
  plain = demo.DemoData(SEQ, BATCH, vocab_size=VOCAB, seed=5, data_dir=data_dir,
                        shuffle_rows=False)
  rows = shuffled.epoch_rows(0)
  n = len(rows["inputs"])
  plain_rows = np.concatenate([next(plain)["inputs"] for _ in range(n // BATCH)])[:n]
  key = lambda a: sorted(map(bytes, a))
  assert key(rows["inputs"]) == key(plain_rows)
  assert not np.array_equal(rows["inputs"], plain_rows)  # really shuffled
  got = np.concatenate([next(shuffled)["inputs"] for _ in range(n // BATCH)])
  np.testing.assert_array_equal(got, rows["inputs"][:len(got)])


def test_unigram_entropy(train, docs):
  h = train.unigram_entropy()
  assert 0 < h < math.log(VOCAB)
  counts = np.zeros(VOCAB)
  for i in train.documents:  # independent count from the text
    ids = train.tokenizer.encode(docs[i][0])
    counts += np.bincount(ids, minlength=VOCAB)
    counts[train.tokenizer.eos_id] += 1
  p = counts[counts > 0] / counts.sum()
  assert h == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_token_ids_checked_against_vocab_size(data_dir, monkeypatch):
  real = demo.load_or_tokenize

  def bad(*a, **kw):
    ids, offsets, sources = real(*a, **kw)
    ids = ids.copy()
    ids[5] = VOCAB
    return ids, offsets, sources

  monkeypatch.setattr(demo, "load_or_tokenize", bad)
  with pytest.raises(ValueError, match=f"vocab_size={VOCAB}"):
    demo.DemoData(SEQ, BATCH, vocab_size=VOCAB, data_dir=data_dir)


def test_bad_arguments(data_dir):
  with pytest.raises(ValueError, match=r"valid choices: \['train', 'validation'\]"):
    demo.DemoData(SEQ, BATCH, vocab_size=VOCAB, data_dir=data_dir, split="test")
  with pytest.raises(ValueError, match=r"valid choices: \['continuous', 'per_document'\]"):
    demo.DemoData(SEQ, BATCH, vocab_size=VOCAB, data_dir=data_dir, positions="abs")
