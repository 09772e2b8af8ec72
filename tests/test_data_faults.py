"""Odd input data: broken JSONL lines and non-UTF-8 bytes are counted per input file, printed at
start-up and written to summary.json ("data_quality"); an empty split stops in one line."""
import json
import logging as std_logging

import pytest

from ctxjax.data import sources, tfds_jsonl
from ctxjax.data.config import data_config

GOOD_TEXT = "def f(x):\n    return x + 1\n# a comment about numbers 12345 and words\n" * 8


def _line(text, source="code"):
  return json.dumps({"text": text, "meta": {"redpajama_set_name": source}}).encode()


def _write(path, lines):
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """a.jsonl: 24 good records, 2 broken lines, 1 record without text, 1 with a latin-1 byte;
  b.jsonl: 12 good records. A sentencepiece model trained on b."""
  from ctxjax.data.tokenizer import train_tokenizer
  d = tmp_path_factory.mktemp("odd")
  good = [_line(f"{GOOD_TEXT} {i}", ("code", "docs")[i % 2]) for i in range(36)]
  bad = [b'{"text": "cut off', b"\xff\xfe not json",
         json.dumps({"meta": {}}).encode(),
         b'{"text": "caf\xe9 au lait ' + b"word " * 20 + b'", "meta": {}}']
  a = _write(d / "a.jsonl", good[:12] + bad + good[12:24])
  b = _write(d / "b.jsonl", good[24:])
  tok = train_tokenizer(b, str(d / "spm"), vocab_size=300)
  return d, a, b, tok.path


def _data_cfg(d, tok, jsonl, **overrides):
  return data_config(dict(name="mixture", seq_len=32, batch_size=2, jsonl=jsonl,
                          tokenizer=tok, tfds_data_dir=str(d / "tfds"), data_dir=str(d),
                          **overrides))


class _Model:
  vocab_size = 300


def test_broken_lines_are_counted_per_file(corpus, caplog):
  d, a, b, tok = corpus
  with caplog.at_level(std_logging.INFO, logger="absl"):
    source = sources.MixtureSource(_data_cfg(d, tok, [a, b]), _Model(), seed=0)
  assert source.data_quality() == {
      a: {"skipped_lines": 3, "repaired_utf8": 1, "defaulted_source": 1, "records": 25},
      b: {"skipped_lines": 0, "repaired_utf8": 0, "defaulted_source": 0, "records": 12}}
  lines = {r.getMessage().split(":")[0]: r for r in caplog.records if "records;" in r.getMessage()}
  assert lines[f"data {a}"].levelno == std_logging.WARNING
  assert "3 lines skipped" in lines[f"data {a}"].getMessage()
  assert "1 repaired" in lines[f"data {a}"].getMessage()
  assert lines[f"data {b}"].levelno == std_logging.INFO


def test_build_stats_add_up_per_file(corpus):
  d, a, b, _ = corpus
  stats = tfds_jsonl.build_jsonl_corpus("two_files", [a, b], data_dir=str(d / "direct"),
                                        validation_fraction=0.2)
  assert set(stats["files"]) == {a, b}
  for key, total in stats["total"].items():
    assert stats["files"][a][key] + stats["files"][b][key] == total


@pytest.mark.parametrize("lines,fraction,match", [
    ([b"{broken", b"[1]"], 0.02, r"data\.jsonl='.*e\.jsonl': split 'train' of corpus .* has no "
                                 r"records \(counters: .*'invalid_json': 2"),
    ([_line(GOOD_TEXT, "code"), _line(GOOD_TEXT + "!", "docs")], 0.0,
     r"data\.jsonl='.*e\.jsonl': the held-out split has no documents"),
])
def test_an_empty_split_stops_in_one_line(corpus, tmp_path, lines, fraction, match):
  d, _, _, tok = corpus
  path = _write(tmp_path / "e.jsonl", lines)
  with pytest.raises(ValueError, match=match) as err:
    sources.MixtureSource(_data_cfg(tmp_path, tok, path, validation_fraction=fraction),
                          _Model(), seed=0)
  assert "\n" not in str(err.value)


@pytest.mark.slow
def test_summary_reports_data_quality(corpus, tmp_path):
  from configs import tiny
  from ctxjax.train.trainer import train
  d, a, b, tok = corpus
  config = tiny.get_config()
  config.model.update(vocab_size=300, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16)
  config.data.update(name="mixture", seq_len=32, batch_size=2, data_dir=str(d))
  config.data.jsonl, config.data.tokenizer = f"{a},{b}", tok
  config.data.tfds_data_dir = str(d / "tfds")
  config.train.update(steps=2, log_every=1, save_every=0, eval_batches=1)
  config.optim.warmup_steps = 1
  summary = train(config, str(tmp_path / "run"))
  written = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert written["data_quality"] == summary["data_quality"]
  assert written["data_quality"][a]["skipped_lines"] == 3
  assert written["data_quality"][a]["repaired_utf8"] == 1
