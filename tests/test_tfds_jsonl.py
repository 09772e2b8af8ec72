"""JSONL corpora as array_record tfds datasets, read back with tfds.data_source (no TensorFlow)."""

import json
import sys

import pytest
import tensorflow_datasets as tfds

from ctxjax.data import tfds_jsonl

GOOD = [(f"document {i} " + "word " * (i % 7), "book" if i % 3 else "web") for i in range(40)]


def _line(text, source=None, **meta):
  obj = {"text": text, "meta": dict(meta, **({"redpajama_set_name": source} if source else {}))}
  return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _write(path, lines):
  with open(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return str(path)


BAD = [
    b'{"text": "caf\xe9 au lait", "meta": {"redpajama_set_name": "web"}}',  # latin-1 byte
    _line("  \n\t ", "web"),                                                 # empty document
    b'{"text": "truncated line", "meta": ',                                  # invalid JSON
    b"[1, 2, 3]",                                                            # not an object
    json.dumps({"meta": {"redpajama_set_name": "web"}}).encode(),            # no text
    _line("a record without a source"),                                      # missing source
    b"   ",                                                                  # blank line
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  path = _write(d / "corpus.jsonl", [_line(t, s) for t, s in GOOD[:20]] + BAD
                + [_line(t, s) for t, s in GOOD[20:]])
  data_dir = str(d / "data")
  stats = tfds_jsonl.build_jsonl_corpus("mixed", [path], data_dir=data_dir,
                                        validation_fraction=0.25, split_seed=1)
  return data_dir, stats


def test_bad_input_is_counted(built):
  _, stats = built
  assert stats["total"] == {"records": 42, "replaced_non_utf8": 1, "invalid_json": 2,
                            "invalid_record": 1, "skipped_empty": 1, "missing_source": 1,
                            "blank_lines": 1}
  for key in stats["total"]:
    assert sum(s[key] for s in stats["splits"].values()) == stats["total"][key]
  assert stats["splits"]["train"]["records"] > stats["splits"]["validation"]["records"] > 0


def test_read_back_with_data_source(built):
  data_dir, stats = built
  want = sorted(GOOD + [("caf\ufffd au lait", "web"), ("a record without a source", "unknown")])
  got = []
  for split in ("train", "validation"):
    src = tfds_jsonl.load_jsonl_corpus("mixed", data_dir=data_dir, split=split)
    assert "ArrayRecord" in type(src.data_source).__name__
    assert len(src) == stats["splits"][split]["records"]
    got += [src[i] for i in range(len(src))]
  assert sorted(got) == want  # every good record exactly once, across the two splits
  assert "tensorflow" not in sys.modules


def test_split_is_stable_and_by_content(built, tmp_path):
  """Same seed, same split; identical lines always land together."""
  data_dir, _ = built
  lines = [_line(t, s) for t, s in GOOD]
  path = _write(tmp_path / "again.jsonl", lines[:10] + lines + lines[10:])  # 40 duplicates
  tfds_jsonl.build_jsonl_corpus("again", [path], data_dir=str(tmp_path / "d"),
                                validation_fraction=0.25, split_seed=1)
  for split in ("train", "validation"):
    first = sorted(tfds_jsonl.load_jsonl_corpus("mixed", data_dir=data_dir, split=split))
    second = sorted(tfds_jsonl.load_jsonl_corpus("again", data_dir=str(tmp_path / "d"),
                                                 split=split))
    good = [r for r in first if r in GOOD]
    assert second == sorted(good + good)


def test_separate_validation_files_and_source_field(tmp_path):
  train = _write(tmp_path / "train.jsonl", [_line(f"t{i}", domain=f"d{i % 2}") for i in range(5)])
  val = _write(tmp_path / "val.jsonl", [_line("v0", domain="d0"), _line("v1")])
  stats = tfds_jsonl.build_jsonl_corpus(
      "files", [train], data_dir=str(tmp_path / "data"), validation_files=(val,),
      source_field="meta.domain", default_source="other")
  assert stats["splits"]["validation"]["missing_source"] == 1
  read = lambda split: sorted(tfds_jsonl.load_jsonl_corpus("files", data_dir=str(tmp_path / "data"),
                                                           split=split))
  assert read("train") == [(f"t{i}", f"d{i % 2}") for i in range(5)]
  assert read("validation") == [("v0", "d0"), ("v1", "other")]


@pytest.mark.parametrize("lines,config,match", [
    ([_line("x", "web"), _line("no source")], {"strict_source": True},
     r"\.jsonl:2: no source at 'meta.redpajama_set_name' \(strict_source=True\)"),
    ([b"{oops"], {"on_invalid": "error"}, r"\.jsonl:1: invalid JSON"),
    ([_line("x", "web")], {"on_invalid": "drop"}, r"on_invalid='drop'; .*valid choices: \['count', 'error'\]"),
    ([_line("x", "web")], {"validation_fraction": 0.01},
     "split 'validation' of corpus 'e' has no records"),
])
def test_errors(tmp_path, lines, config, match):
  path = _write(tmp_path / "e.jsonl", lines)
  with pytest.raises(ValueError, match=match):
    tfds_jsonl.build_jsonl_corpus("e", [path], data_dir=str(tmp_path / "data"), **config)


class FakeBooks(tfds.core.GeneratorBasedBuilder):
  """A pg19-shaped dataset (text under ``book_text``) standing in for a user's tfds data."""
  VERSION = tfds.core.Version("0.1.0")
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "book_text": tfds.features.Text(), "meta": {"title": tfds.features.Text()}}))

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      yield i, {"book_text": f"chapter {i}", "meta": {"title": f"book {i}"}}


def test_any_tfds_dataset_by_name(tmp_path):
  data_dir = str(tmp_path)
  FakeBooks(data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD
            ).download_and_prepare()
  src = tfds_jsonl.tfds_text_source("fake_books:0.1.0", split="test", data_dir=data_dir,
                                    text_feature="book_text")
  assert sorted(src) == [(f"chapter {i}", "fake_books") for i in range(3)]
  titled = tfds_jsonl.tfds_text_source("fake_books:0.1.0", split="test", data_dir=data_dir,
                                       text_feature="book_text", source_feature="meta.title")
  assert sorted(titled) == [(f"chapter {i}", f"book {i}") for i in range(3)]
  with pytest.raises(ValueError, match=r"feature 'text' not in the dataset; it has: "
                     r"\['book_text', 'meta.title'\]"):
    tfds_jsonl.tfds_text_source("fake_books:0.1.0", split="test", data_dir=data_dir)
