"""What an evaluation reads: a model (a ctxjax workdir's newest checkpoint, or a Hugging Face
directory), its tokenizer, its training length, and held-out text per source.

Bad input raises `EvalInputError` with one line naming the problem (the command prints it and
exits 2): a workdir without a checkpoint or tokenizer, a length past an absolute position table.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from ctxjax import storage


class EvalInputError(ValueError):
  """A problem with the user's input, reported as one line (no traceback)."""


@dataclasses.dataclass
class Run:
  name: str
  model: Any            # ctxjax.model.transformer.Transformer
  variables: Any
  tokenizer: Any        # ctxjax.data.tokenizer.Tokenizer
  train_length: int
  data_cfg: dict


def _read_config(workdir: str) -> dict | None:
  path = storage.join(workdir, "config.json")
  if not storage.isfile(path):
    return None
  return storage.read_json(path)


def train_length_of(config: dict | None, model_cfg) -> int:
  """The longest sequence the run trained on (its last stage's seq_len); without a training
  config, the original context of a rope scaling, else max_position_embeddings."""
  if config:
    stages = config.get("stages") or []
    lengths = [int(s["seq_len"]) for s in stages if "seq_len" in s]
    return max(lengths) if lengths else int(config["data"]["seq_len"])
  scaling = model_cfg.rope_scaling or {}
  return int(scaling.get("original_max_position_embeddings") or model_cfg.max_position_embeddings)


def _tokenizer(config: dict | None, vocab_size: int, tokenizer_path: str | None, where: str):
  from ctxjax.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  data_cfg = dict((config or {}).get("data") or {})
  path = tokenizer_path or data_cfg.get("tokenizer") or ""
  if not path:
    if config is None:
      raise EvalInputError(f"{where} has no config.json naming its tokenizer; pass --tokenizer")
    path = tokenizer_lib.demo_tokenizer_path(data_cfg.get("data_dir") or None, vocab_size)
  try:
    tok = (tokenizer_lib.load_hf_tokenizer(path) if os.path.isdir(path)
           else tokenizer_lib.load_tokenizer(path))
    tokenizer_lib.check_vocab(tok, vocab_size)
  except (FileNotFoundError, ValueError) as e:
    raise EvalInputError(f"tokenizer of {where}: {e}") from None
  return tok, data_cfg


def load_run(workdir: str, *, step: int | None = None, hf_dir: str | None = None,
             tokenizer_path: str | None = None) -> Run:
  """The model under evaluation: `hf_dir` when given, else `workdir`'s checkpoint."""
  import jax  # noqa: PLC0415
  if hf_dir:
    from ctxjax import hf  # noqa: PLC0415
    if not os.path.isdir(hf_dir):
      raise EvalInputError(f"--hf={hf_dir}: no such directory")
    try:
      model, variables = hf.load(hf_dir)
    except (FileNotFoundError, ValueError) as e:
      raise EvalInputError(f"--hf={hf_dir}: {e}") from None
    config, where, name = None, hf_dir, os.path.basename(os.path.normpath(hf_dir))
    tokenizer_path = tokenizer_path or hf_dir
  else:
    from ctxjax.export_hf import read_workdir  # noqa: PLC0415
    if not storage.isdir(workdir):
      raise EvalInputError(f"--workdir={workdir}: no such directory")
    try:
      model, variables, _ = read_workdir(workdir, step)
    except FileNotFoundError as e:
      raise EvalInputError(f"--workdir={workdir} has no checkpoint to evaluate: {e}") from None
    except ValueError as e:
      raise EvalInputError(f"--workdir={workdir}: {e}") from None
    config, where = _read_config(workdir), workdir
    name = storage.basename(workdir)
  tok, data_cfg = _tokenizer(config, model.cfg.vocab_size, tokenizer_path, where)
  return Run(name, model, jax.device_put(variables), tok, train_length_of(config, model.cfg),
             data_cfg)


def check_lengths(model_cfg, lengths: Sequence[int], extra: int = 0) -> None:
  """Refuses lengths whose positions (length + `extra` tokens) pass an absolute table."""
  from ctxjax.positions import schemes  # noqa: PLC0415
  scheme = schemes.get_scheme(model_cfg.position_embedding_type)
  bad = [int(L) for L in lengths if int(L) < 1]
  if bad:
    raise EvalInputError(f"--lengths: {bad} are not positive")
  if scheme.absolute is None:
    return
  top = model_cfg.max_position_embeddings
  bad = [int(L) for L in lengths if int(L) + extra > top]
  if bad:
    raise EvalInputError(
        f"--lengths={bad} (+{extra} tokens) pass the {scheme.name} position table of "
        f"max_position_embeddings={top}; valid lengths: <= {top - extra}")


def held_out(run: Run, max_docs_per_source: int | None = None
             ) -> tuple[dict[str, list[np.ndarray]], list[str]]:
  """({source: held-out token arrays}, held-out texts for haystacks). The demo corpus: its
  per-source validation documents (ctxjax/data/demo.py); another corpus: its eval documents
  as one source "eval"."""
  from ctxjax.data import corpus as corpus_lib  # noqa: PLC0415
  from ctxjax.data import demo, sources  # noqa: PLC0415
  cfg = run.data_cfg
  if any(cfg.get(k) for k in sources.CORPORA):
    import ml_collections  # noqa: PLC0415  (the loaders read data_cfg.<key>, as in training)
    _, _, docs = sources.load_documents(ml_collections.ConfigDict(cfg), run.tokenizer)
    docs = docs[:max_docs_per_source]
    return {"eval": docs}, [run.tokenizer.decode(d.tolist()) for d in docs]
  jsonl = corpus_lib.ensure_demo_corpus(cfg.get("data_dir") or None)
  ids, offsets, srcs = demo.load_or_tokenize(jsonl, run.tokenizer)
  held = demo.validation_documents(srcs)
  by_source: dict[str, list[np.ndarray]] = {}
  for i in held:
    docs = by_source.setdefault(srcs[i], [])
    if max_docs_per_source is None or len(docs) < max_docs_per_source:
      docs.append(ids[offsets[i]:offsets[i + 1]])
  wanted = set(int(i) for i in held)
  texts = [t for i, (t, _) in enumerate(corpus_lib.read_jsonl(jsonl)) if i in wanted]
  return by_source, texts
