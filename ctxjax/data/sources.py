"""`config.data.name = "mixture"`: corpus -> sentencepiece -> length mixture -> grain pipeline.

Config keys (under config.data, typed and defaulted in ctxjax/data/config.py: DataConfig; the
trainer's source interface is in ctxjax/data/registry.py):
  jsonl           SlimPajama-shaped JSONL file(s) (a path, comma-separated paths or a list),
                  prepared once as a tfds array_record dataset (ctxjax/data/tfds_jsonl.py)
                  under tfds_data_dir (default: data_dir's cache); validation_fraction
                  (default 0.02) of its lines held out (tfds_jsonl's hash split; 0 holds
                  out ~2% of each source's documents after loading instead).
  tfds_name       or any prepared tfds dataset with a text feature (e.g. "pg19:0.1.1") in
                  tfds_data_dir; tfds_text_feature (default "text"), tfds_source_feature
                  (default: one source named after the dataset), tfds_eval_split
                  (default "validation"; "" holds out 2% of train per source instead).
                  Neither: the bundled demo corpus (built on first use under data_dir).
  tokenizer       a sentencepiece .model file or a Hugging Face directory with
                  tokenizer.model; "" = the demo tokenizer with model.vocab_size pieces.
  mixture         dict(kind, short_threshold, target_context, long_share, sources, ...)
                  of ctxjax/data/mixtures.py, applied to the training documents; None or
                  kind="" = the documents as they are.
  seq_len, batch_size (GLOBAL), packed_positions, shuffle_seed (None = train.seed),
  shuffle_rows (default True), num_threads / prefetch_batches (grain prefetching),
  workdir         where mixture_stats.json (+ .png) go; "" = not written.
Multi-host: each process packs only its row block (ctxjax/data/pipeline.py); the data state
is the same on every process.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from ctxjax.data import corpus as corpus_lib
from ctxjax.data import demo, packing
from ctxjax.data import tokenizer as tokenizer_lib
from ctxjax.registry import Registry

_ENCODE_CHUNK = 1024  # texts per sentencepiece call (bounds the strings held at once)

Documents = tuple[list[np.ndarray], list[str], list[np.ndarray]]  # train, train sources, eval


def load_tokenizer(data_cfg, vocab_size: int) -> tokenizer_lib.Tokenizer:
  path = data_cfg.tokenizer
  if not path:
    return tokenizer_lib.ensure_demo_tokenizer(data_cfg.data_dir or None, vocab_size)
  tok = (tokenizer_lib.load_hf_tokenizer(path) if os.path.isdir(path)
         else tokenizer_lib.load_tokenizer(path))
  tokenizer_lib.check_vocab(tok, vocab_size)
  return tok


def _encode(pairs, tok) -> tuple[list[np.ndarray], list[str]]:
  """(text, source) pairs -> token-id arrays (no bos/eos) and sources."""
  docs, sources, texts = [], [], []

  def flush():
    docs.extend(np.asarray(ids, np.int32) for ids in tok.encode_batch(texts))
    texts.clear()

  for text, source in pairs:
    texts.append(text)
    sources.append(source)
    if len(texts) == _ENCODE_CHUNK:
      flush()
  flush()
  return docs, sources


def _held_out(docs: list[np.ndarray], sources: list[str]) -> Documents:
  """~2% of each source's documents as validation (the demo corpus' rule)."""
  held = set(demo.validation_documents(sources).tolist())
  train = [i for i in range(len(docs)) if i not in held]
  return [docs[i] for i in train], [sources[i] for i in train], [docs[i] for i in sorted(held)]


def _demo_documents(data_cfg, tok) -> Documents:
  jsonl = corpus_lib.ensure_demo_corpus(data_cfg.data_dir or None)
  ids, offsets, sources = demo.load_or_tokenize(jsonl, tok)  # cached next to the corpus
  docs = [ids[offsets[i]:offsets[i + 1]] for i in range(len(sources))]
  return _held_out(docs, sources)


def _jsonl_files(value) -> list[str]:
  files = value.split(",") if isinstance(value, str) else list(value)
  return [os.path.abspath(f.strip()) for f in files if f.strip()]


def _jsonl_corpus(data_cfg) -> tuple[str, list[str], str]:
  """(tfds name, files, tfds data_dir) of data.jsonl's prepared corpus."""
  files = _jsonl_files(data_cfg.jsonl)
  missing = [f for f in files if not os.path.isfile(f)]
  if missing or not files:
    raise ValueError(f"data.jsonl={data_cfg.jsonl!r}: no such file(s) {missing}")
  # tfds reuses a prepared dataset by name: the name follows the files' paths, sizes, mtimes.
  key = "|".join(f"{f}:{os.path.getsize(f)}:{os.path.getmtime(f)}" for f in files)
  key += f"|{data_cfg.validation_fraction}"
  name = "c" + hashlib.sha1(key.encode()).hexdigest()[:12]
  return name, files, data_cfg.tfds_data_dir or corpus_lib.corpus_dir(data_cfg.data_dir or None)


def _jsonl_documents(data_cfg, tok) -> Documents:
  from ctxjax.data import tfds_jsonl
  name, files, data_dir = _jsonl_corpus(data_cfg)
  fraction = data_cfg.validation_fraction
  try:
    tfds_jsonl.build_jsonl_corpus(name, files, data_dir=data_dir, validation_fraction=fraction)
  except ValueError as err:  # e.g. a split with no records: name the setting, not the hash
    raise ValueError(f"data.jsonl={data_cfg.jsonl!r}: {err}") from None
  train_docs, train_src = _encode(tfds_jsonl.load_jsonl_corpus(name, data_dir=data_dir), tok)
  if not fraction:
    return _held_out(train_docs, train_src)
  eval_docs, _ = _encode(
      tfds_jsonl.load_jsonl_corpus(name, data_dir=data_dir, split="validation"), tok)
  return train_docs, train_src, eval_docs


def _tfds_documents(data_cfg, tok) -> Documents:
  from ctxjax.data import tfds_jsonl
  common = dict(data_dir=data_cfg.tfds_data_dir or None,
                text_feature=data_cfg.tfds_text_feature or "text",
                source_feature=data_cfg.tfds_source_feature or None)
  name = data_cfg.tfds_name
  docs, sources = _encode(tfds_jsonl.tfds_text_source(name, split="train", **common), tok)
  eval_split = data_cfg.tfds_eval_split
  if not eval_split:
    return _held_out(docs, sources)
  eval_docs, _ = _encode(tfds_jsonl.tfds_text_source(name, split=eval_split, **common), tok)
  return docs, sources, eval_docs


# Which corpus: the config key that names it -> loader (none set: the demo corpus).
CORPORA: Registry[Callable[[Any, tokenizer_lib.Tokenizer], Documents]] = Registry("data corpus")
CORPORA.add("jsonl", _jsonl_documents)
CORPORA.add("tfds_name", _tfds_documents)


def _corpus_setting(data_cfg) -> str | None:
  """The config key that names the corpus (None: the demo corpus)."""
  given = [key for key in CORPORA if getattr(data_cfg, key)]
  if len(given) > 1:
    raise ValueError(f"data.{given[0]} and data.{given[1]} are both set; name one corpus")
  return given[0] if given else None


def load_documents(data_cfg, tok) -> Documents:
  """The corpus' (train docs, train sources, held-out docs); an empty split stops here, in one
  line (training or evaluating on nothing would fail later, or silently report nothing)."""
  key = _corpus_setting(data_cfg)
  load = CORPORA[key] if key else _demo_documents
  train_docs, train_sources, eval_docs = load(data_cfg, tok)
  for split, docs in (("training", train_docs), ("held-out", eval_docs)):
    if not docs:
      what = f"data.{key}={getattr(data_cfg, key)!r}" if key else "the demo corpus"
      raise ValueError(f"{what}: the {split} split has no documents; give more documents "
                       f"(or check data.validation_fraction / data.tfds_eval_split)")
  return train_docs, train_sources, eval_docs


def data_quality(data_cfg) -> dict[str, dict[str, int]]:
  """{input file: {"skipped_lines", "repaired_utf8", "defaulted_source", "records"}} of a
  data.jsonl corpus (tfds_jsonl's build counters); {} for corpora that have no such counts."""
  if _corpus_setting(data_cfg) != "jsonl":
    return {}
  from ctxjax.data import tfds_jsonl
  name, files, data_dir = _jsonl_corpus(data_cfg)
  return tfds_jsonl.data_quality(tfds_jsonl.read_build_stats(name, data_dir=data_dir), files)


def log_data_quality(quality: dict[str, dict[str, int]]) -> None:
  """One line per input file at start-up: a warning when lines were skipped or repaired."""
  for path, c in quality.items():
    log = logging.warning if c["skipped_lines"] or c["repaired_utf8"] else logging.info
    log("data %s: %d records; %d lines skipped (invalid JSON, no text or empty text), %d "
        "repaired (non-UTF-8 bytes -> U+FFFD), %d without a source", path, c["records"],
        c["skipped_lines"], c["repaired_utf8"], c["defaulted_source"])


def _mixture_config(data_cfg) -> dict | None:
  mix = data_cfg.mixture
  return dict(mix) if mix and mix.get("kind") else None


def unigram_entropy(docs: Sequence[np.ndarray], eos_id: int, vocab_size: int) -> float:
  """Entropy (nats/token) of the training targets' unigram distribution (tokens + one eos
  per document; bos is never a target)."""
  counts = np.zeros(vocab_size, np.int64)
  for d in docs:
    counts += np.bincount(d, minlength=vocab_size)[:vocab_size]
  counts[eos_id] += len(docs)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


class MixtureSource:
  """Trainer data source: tokenized corpus -> optional mixture -> PackedBatches."""

  def __init__(self, data_cfg, model_cfg, seed: int):
    import grain  # here, not at module level: the registry import stays cheap (~1 s of grain)
    from ctxjax.data import pipeline
    self.tokenizer = tok = load_tokenizer(data_cfg, int(model_cfg.vocab_size))
    if tok.eos_id < 0:
      raise ValueError(f"data.tokenizer={data_cfg.tokenizer!r} has no eos id; packing "
                       f"needs one to end documents")
    self.bos_id = tok.bos_id if tok.bos_id >= 0 else None
    self.pad_id = tok.pad_id if tok.pad_id >= 0 else 0  # LLaMA has none; pads are masked
    train_docs, train_sources, self.eval_docs = load_documents(data_cfg, tok)
    self._quality = data_quality(data_cfg)
    log_data_quality(self._quality)
    shuffle_seed = data_cfg.shuffle_seed
    self.seed = int(seed if shuffle_seed is None else shuffle_seed)
    self.mixture_stats = None
    mix = _mixture_config(data_cfg)
    if mix is not None:
      from ctxjax.data import mixtures
      result = mixtures.apply_mixture(train_docs, train_sources, mix, seed=self.seed)
      train_docs, train_sources, self.mixture_stats = result.docs, result.sources, result.stats
    self.train_docs, self.train_sources = train_docs, train_sources
    self.vocab_size = int(model_cfg.vocab_size)
    self.seq_len, self.batch_size = int(data_cfg.seq_len), int(data_cfg.batch_size)
    self.positions = data_cfg.packed_positions
    shard = grain.sharding.ShardOptions(shard_index=data_cfg.process_index,
                                        shard_count=data_cfg.process_count)
    self._rows = data_cfg.process_rows()
    self._train = pipeline.PackedBatches(
        train_docs, seq_len=self.seq_len, batch_size=self.batch_size, bos_id=self.bos_id,
        eos_id=tok.eos_id, pad_id=self.pad_id, positions=self.positions, seed=self.seed,
        shuffle_rows=data_cfg.shuffle_rows, shard=shard, num_threads=data_cfg.num_threads,
        prefetch_batches=data_cfg.prefetch_batches)
    workdir = data_cfg.workdir
    if self.mixture_stats is not None and workdir and shard.shard_index == 0:
      from ctxjax.data import mixture_stats
      self.mixture_stats["pipeline"] = self._train.rows.stats()
      mixture_stats.write_stats(self.mixture_stats, workdir)
    self._entropy = None

  def train_batches(self):
    return self._train

  def eval_batches(self):
    """One pass over the held-out documents in order; the last batch padded with empty rows."""
    rows = packing.pack_documents(
        (d for d in self.eval_docs if len(d)), seq_len=self.seq_len, bos_id=self.bos_id,
        eos_id=self.tokenizer.eos_id, pad_id=self.pad_id, positions=self.positions)
    batches = packing.batch_rows(rows, self.batch_size, remainder="pad", pad_id=self.pad_id)
    return ({k: v[self._rows] for k, v in b.items()} for b in batches)

  def unigram_entropy(self) -> float:
    if self._entropy is None:
      self._entropy = unigram_entropy(self.train_docs, self.tokenizer.eos_id, self.vocab_size)
    return self._entropy

  def data_quality(self) -> dict[str, dict[str, int]]:
    """Skipped and repaired input per file (summary.json "data_quality"); see data_quality."""
    return self._quality

  def train_state(self) -> dict:
    return self._train.state

  def restore_train(self, state: dict) -> None:
    self._train.restore(state)

