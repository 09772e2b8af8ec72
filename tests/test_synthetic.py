"""Synthetic long-context tasks, and loading a tokenizer from a Hugging Face directory."""

import json
import os
import shutil

import numpy as np
import pytest

from ctxjax.data import corpus, synthetic, tokenizer

TASKS = list(synthetic.TASKS)
# Real-looking haystack text: sentences and code lines.
HAYSTACK = [
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money in "
    "my purse, I thought I would sail about a little and see the watery part of the world.\n"
    * 6,
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n" * 8,
    "Permission is hereby granted, free of charge, to any person obtaining a copy. " * 10,
]


class ByteTokenizer:
  """Ids are UTF-8 bytes: token counts and spans are checkable by hand."""
  vocab_size = 256

  def encode(self, text):
    return list(text.encode("utf-8"))

  def decode(self, ids):
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
  """A small sentencepiece model (trained here), loaded back from an HF-style directory."""
  d = tmp_path_factory.mktemp("tok")
  jsonl = d / "train.jsonl"
  lines = HAYSTACK + [synthetic.GARBAGE * 3, synthetic.PASSKEY_HEADER,
                      synthetic.RULER_HEADER, synthetic.FU_NEEDLE, "0123456789 " * 20]
  with open(jsonl, "w") as f:
    for text in lines:
      f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": "x"}}) + "\n")
  tokenizer.train_tokenizer(str(jsonl), str(d / "spm"), vocab_size=400)
  hf = d / "hf_model"
  hf.mkdir()
  shutil.copy(d / "spm.model", hf / "tokenizer.model")
  (hf / "config.json").write_text("{}")
  return tokenizer.load_hf_tokenizer(str(hf))


def _haystack(task):
  return HAYSTACK if task == "needle" else None


@pytest.mark.parametrize("task", TASKS)
def test_exact_length_spans_and_tail(sp_tok, task):
  for length, depth in ((700, 0.0), (1017, 0.37), (1500, 1.0)):
    s = synthetic.make_sample(task, sp_tok, length=length, depth=depth, seed=1,
                              haystack=_haystack(task))
    assert s.prompt_ids.dtype == np.int32 and len(s.prompt_ids) == length
    assert s.prompt == sp_tok.decode(s.prompt_ids.tolist())
    spans = s.metadata["needle_spans"]
    texts = [sp_tok.decode(s.prompt_ids[a:b].tolist()) for a, b in spans]
    assert all(a < b for a, b in spans)
    for value in s.answers:  # every expected value sits in a needle
      assert any(value in t for t in texts), (value, texts)
    assert s.answer.strip(" .").split(", ") == list(s.answers) or s.answer == " " + s.answers[0]


def test_passkey_matches_hand_built_prompt():
  """With byte ids the prompt is header + filler[:p] + needle + filler[p:] + question."""
  tok = ByteTokenizer()
  length, depth = 600, 0.5
  s = synthetic.passkey_sample(tok, length=length, depth=depth, seed=7)
  k = s.metadata["passkey"]
  needle = synthetic.PASSKEY_NEEDLE.format(k=k)
  budget = length - len(synthetic.PASSKEY_HEADER) - len(needle) - len(synthetic.PASSKEY_QUESTION)
  filler = " ".join([synthetic.GARBAGE] * 20)[:budget]
  p = filler.rfind(".", 0, int(budget * depth)) + 1  # back to the sentence end
  assert s.prompt == (synthetic.PASSKEY_HEADER + filler[:p] + needle + filler[p:]
                      + synthetic.PASSKEY_QUESTION)
  start = len(synthetic.PASSKEY_HEADER) + p
  assert s.metadata["needle_spans"] == [(start, start + len(needle))]
  assert s.metadata["needle_depths"] == [p / budget]
  assert s.answer == f" {k}" and s.answers == (str(k),) and 1 <= k <= 50000


@pytest.mark.parametrize("depth", [0.0, 1.0])
def test_extreme_depths(depth):
  tok = ByteTokenizer()
  s = synthetic.needle_sample(tok, length=800, depth=depth, seed=0, haystack=HAYSTACK)
  (a, b), = s.metadata["needle_spans"]
  if depth == 0.0:
    assert a == len(synthetic.FU_HEADER)
  else:
    tail = synthetic.FU_TAIL.format(question=synthetic.FU_QUESTION)
    assert s.prompt.endswith(tail)
    rest = s.prompt[b:800 - len(tail)]  # filler after the needle: no sentence end left
    assert rest and not any(c in rest for c in ".!?\n")


def test_niah_multikey_multivalue_multiquery():
  tok = ByteTokenizer()
  s = synthetic.niah_sample(tok, length=3000, depth=0.25, seed=3, num_keys=5, num_values=3,
                            num_queries=2, haystack=HAYSTACK)
  m = s.metadata
  assert len(m["needle_spans"]) == 15 and len(m["keys"]) == len(set(m["keys"])) == 5
  assert len(s.answers) == 6 == len(set(s.answers))
  needles = [s.prompt[a:b] for a, b in m["needle_spans"]]
  for i, value in zip(m["answer_needles"], s.answers):
    key = next(k for k in m["query_keys"] if k in needles[i])
    assert needles[i] == f"\nOne of the special magic numbers for {key} is: {value}.\n"
  distractors = [n for n in needles if not any(k in n for k in m["query_keys"])]
  assert len(distractors) == 9 and not any(v in d for v in s.answers for d in distractors)
  q = m["query_keys"]
  assert s.prompt.endswith(f"numbers for {q[0]}, and {q[1]} mentioned in the provided text are")
  assert abs(m["needle_depths"][0] - 0.25) < 0.05 and m["needle_depths"][0] <= 0.25


def test_deterministic_from_seed(sp_tok):
  for task in TASKS:
    kw = dict(length=800, depth=0.5, haystack=_haystack(task))
    a = synthetic.make_sample(task, sp_tok, seed=11, **kw)
    b = synthetic.make_sample(task, sp_tok, seed=11, **kw)
    assert np.array_equal(a.prompt_ids, b.prompt_ids) and a.answer == b.answer
  keys = {synthetic.passkey_sample(sp_tok, length=200, depth=0.5, seed=i).answer for i in range(5)}
  assert len(keys) == 5


def test_errors_name_the_parameter():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="length=50 is too short for task 'passkey'"):
    synthetic.passkey_sample(tok, length=50, depth=0.5, seed=0)
  with pytest.raises(ValueError, match=r"depth=1.5: a fraction in \[0, 1\]"):
    synthetic.passkey_sample(tok, length=500, depth=1.5, seed=0)
  with pytest.raises(ValueError, match="needs haystack"):
    synthetic.needle_sample(tok, length=500, depth=0.5, seed=0, haystack=None)
  with pytest.raises(ValueError, match=r"num_queries=3 must be in \[1, num_keys=2\]"):
    synthetic.niah_sample(tok, length=900, depth=0.5, seed=0, num_keys=2, num_queries=3)
  with pytest.raises(ValueError, match=r"task='quiz'; .*valid choices: \['needle'"):
    synthetic.make_sample("quiz", tok, length=500, depth=0.5, seed=0)


def test_records_are_a_slimpajama_source(sp_tok, tmp_path):
  recs = list(synthetic.synthetic_records(sp_tok, "niah_multikey", num_samples=4,
                                          lengths=[700, 900], depths=[0.1, 0.9], seed=2,
                                          haystack=HAYSTACK))
  path = str(tmp_path / "synthetic.jsonl")
  assert synthetic.write_jsonl(path, recs) == 4
  back = list(corpus.read_jsonl(path))
  assert [s for _, s in back] == ["synthetic_niah_multikey"] * 4
  assert [(r["meta"]["length"], r["meta"]["depth"]) for r in recs] == [
      (700, 0.1), (900, 0.1), (700, 0.9), (900, 0.9)]
  for (text, _), r in zip(back, recs):
    s = synthetic.make_sample("niah_multikey", sp_tok, length=r["meta"]["length"],
                              depth=r["meta"]["depth"], seed=r["meta"]["seed"], haystack=HAYSTACK)
    assert text == s.prompt + s.answer and r["meta"]["answer"] == s.answer


# -- tokenizer loading ---------------------------------------------------------

def test_load_hf_tokenizer_and_missing_file(sp_tok, tmp_path):
  assert sp_tok.vocab_size == 400 and sp_tok.path.endswith(os.path.join("hf_model",
                                                                        "tokenizer.model"))
  direct = tokenizer.load_tokenizer(sp_tok.path)
  assert direct.encode(synthetic.FU_NEEDLE) == sp_tok.encode(synthetic.FU_NEEDLE)
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"no tokenizer.model at .* \(the directory "
                     r"has: tokenizer.json\)"):
    tokenizer.load_hf_tokenizer(str(tmp_path))


def test_check_vocab(sp_tok):
  tokenizer.check_vocab(sp_tok, 400)
  tokenizer.check_vocab(sp_tok, 512)  # padded embedding tables are fine
  with pytest.raises(ValueError, match=r"vocab_size=400, more than model.vocab_size=399"):
    tokenizer.check_vocab(sp_tok, 399)
