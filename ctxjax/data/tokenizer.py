"""SentencePiece tokenizer: training on the demo corpus, loading, encode/decode.

Special ids (fixed for every tokenizer ctxjax trains):
  pad = 0, unk = 1, bos = 2, eos = 3
``pad`` is 0 so zero-initialised / zero-padded batches are padding. With
``byte_fallback`` the next 256 ids are the byte pieces ``<0x00>``..``<0xFF>``,
so any text (code, non-Latin, control characters) encodes without ``unk``.

Text is kept verbatim: identity normalisation, no whitespace collapsing and no
dummy prefix, so ``decode(encode(text)) == text`` for any string (code
indentation, tabs, newlines included). Training reads an in-memory,
deterministic subsample of the corpus (``sample_bytes``), cut into pieces of at
most ``max_sentence_chars`` characters at line boundaries, so that newlines are
part of the learned pieces.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from ctxjax.data import corpus as corpus_lib
from ctxjax.registry import unknown_choice

MODEL_TYPES = ("bpe", "unigram", "char", "word")  # sentencepiece's

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
  """A thin wrapper over ``sentencepiece.SentencePieceProcessor``."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
    self._sp = processor
    self.path = path

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  @property
  def bos_id(self) -> int:
    return int(self._sp.bos_id())

  @property
  def eos_id(self) -> int:
    return int(self._sp.eos_id())

  @property
  def pad_id(self) -> int:
    return int(self._sp.pad_id())

  @property
  def unk_id(self) -> int:
    return int(self._sp.unk_id())

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    return self._sp

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without bos/eos (packing adds them)."""
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def fingerprint(self) -> str:
    """Short hash of the serialized model (keys caches of token ids)."""
    return hashlib.sha1(self._sp.serialized_model_proto()).hexdigest()[:12]

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def load_tokenizer(path: str) -> Tokenizer:
  """Loads ``path`` (a ``.model`` file; ``.model`` is appended if missing)."""
  if not os.path.isfile(path) and os.path.isfile(path + ".model"):
    path = path + ".model"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no sentencepiece model at {path}")
  return Tokenizer(spm.SentencePieceProcessor(model_file=path), path)


def _pieces(text: str, max_chars: int) -> Iterator[str]:
  """Cuts ``text`` at line ends into pieces of at most ``max_chars`` characters."""
  buf: list[str] = []
  size = 0
  for line in text.splitlines(keepends=True):
    while len(line) > max_chars:  # a single very long line
      if buf:
        yield "".join(buf)
        buf, size = [], 0
      yield line[:max_chars]
      line = line[max_chars:]
    if size + len(line) > max_chars and buf:
      yield "".join(buf)
      buf, size = [], 0
    buf.append(line)
    size += len(line)
  if buf:
    yield "".join(buf)


def training_sample(jsonl_path: str, *, max_sentence_chars: int, sample_bytes: int,
                    seed: int = 0) -> list[str]:
  """Deterministic subsample (about ``sample_bytes`` characters) of corpus pieces."""
  pieces = [p for text, _ in corpus_lib.read_jsonl(jsonl_path)
            for p in _pieces(text, max_sentence_chars) if p.strip()]
  order = list(range(len(pieces)))
  random.Random(seed).shuffle(order)
  chosen, total = [], 0
  for i in order:
    if total >= sample_bytes:
      break
    chosen.append(i)
    total += len(pieces[i])
  chosen.sort()  # corpus order: stable across Python versions' shuffles of equal data
  return [pieces[i] for i in chosen]


def train_tokenizer(
    jsonl_path: str,
    model_prefix: str,
    *,
    vocab_size: int = 1024,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentence_chars: int = 2048,
    sample_bytes: int = 3_000_000,
    seed: int = 0,
    num_threads: int = 2,
) -> Tokenizer:
  """Trains a sentencepiece model on ``jsonl_path``; writes ``model_prefix.{model,vocab}``.

  Deterministic for fixed inputs (the subsample is seeded and sentencepiece's
  own input shuffling is off). Special ids: pad 0, unk 1, bos 2, eos 3.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(unknown_choice("model_type", model_type, MODEL_TYPES))
  min_vocab = 4 + (256 if byte_fallback else 0) + 1
  if vocab_size < min_vocab:
    raise ValueError(f"vocab_size={vocab_size} is below the minimum {min_vocab} "
                     f"(4 special ids{' + 256 byte pieces' if byte_fallback else ''} + 1)")
  sample = training_sample(jsonl_path, max_sentence_chars=max_sentence_chars,
                           sample_bytes=sample_bytes, seed=seed)
  if not sample:
    raise ValueError(f"{jsonl_path} has no text to train a tokenizer on")
  model = io.BytesIO()  # not model_prefix: that path would be baked into the model
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4 * max_sentence_chars,  # bytes
        input_sentence_size=0,
        shuffle_input_sentence=False,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        num_threads=num_threads,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(f"sentencepiece training on {jsonl_path} (vocab_size={vocab_size}) "
                     f"failed: {e}") from e
  d = os.path.dirname(os.path.abspath(model_prefix))
  os.makedirs(d, exist_ok=True)
  with open(model_prefix + ".model", "wb") as f:
    f.write(model.getvalue())
  tok = load_tokenizer(model_prefix + ".model")
  with open(model_prefix + ".vocab", "w", encoding="utf-8") as f:
    sp = tok.processor
    for i in range(sp.get_piece_size()):
      f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
  return tok


def demo_tokenizer_path(data_dir: str | None = None, vocab_size: int = 1024) -> str:
  return os.path.join(corpus_lib.corpus_dir(data_dir), f"spm_bpe_v{vocab_size}.model")


def ensure_demo_tokenizer(data_dir: str | None = None, vocab_size: int = 1024) -> Tokenizer:
  """Trains the demo tokenizer once next to the demo corpus (atomically) and loads it."""
  path = demo_tokenizer_path(data_dir, vocab_size)
  if not os.path.isfile(path):
    jsonl = corpus_lib.ensure_demo_corpus(data_dir)
    d = os.path.dirname(path)
    tmp = tempfile.mkdtemp(prefix=".tmp-spm-", dir=d)
    try:
      prefix = os.path.join(tmp, "spm")
      train_tokenizer(jsonl, prefix, vocab_size=vocab_size)
      os.replace(prefix + ".vocab", path[: -len(".model")] + ".vocab")
      os.replace(prefix + ".model", path)  # last: its presence means "done"
    finally:
      for name in os.listdir(tmp):
        os.remove(os.path.join(tmp, name))
      os.rmdir(tmp)
  tok = load_tokenizer(path)
  if tok.vocab_size != vocab_size:
    raise ValueError(f"{path} has vocab_size={tok.vocab_size}, expected {vocab_size}")
  return tok


HF_TOKENIZER_FILE = "tokenizer.model"


def load_hf_tokenizer(hf_dir: str) -> Tokenizer:
  """The sentencepiece ``tokenizer.model`` of a Hugging Face model directory (e.g. LLaMA).

  Its special ids are the file's own (LLaMA: unk 0, bos 1, eos 2, no pad, so
  ``pad_id`` is -1), not ctxjax's 0..3; packing reads them from the Tokenizer.
  Raises FileNotFoundError naming the missing file (a directory with only a
  fast-tokenizer ``tokenizer.json`` has no sentencepiece model to load).
  """
  path = os.path.join(hf_dir, HF_TOKENIZER_FILE)
  if not os.path.isfile(path):
    have = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else None
    raise FileNotFoundError(
        f"no {HF_TOKENIZER_FILE} at {path}" +
        (f" (the directory has: {', '.join(have) or 'nothing'})" if have is not None
         else " (no such directory)"))
  return load_tokenizer(path)


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
  """Raises ValueError when the tokenizer's ids do not fit ``model.vocab_size``.

  A smaller tokenizer is fine (embedding rows are often padded to a multiple of
  128); a larger one would index past the embedding table.
  """
  if tokenizer.vocab_size > int(vocab_size):
    raise ValueError(
        f"tokenizer {tokenizer.path or ''} has vocab_size={tokenizer.vocab_size}, more "
        f"than model.vocab_size={int(vocab_size)}: ids >= {int(vocab_size)} would index "
        f"past the embedding table; set model.vocab_size >= {tokenizer.vocab_size}")
