"""Local JSONL corpora as a tfds dataset (array_record), read back without TensorFlow.

``build_jsonl_corpus`` prepares ``JsonlCorpus`` (a ``GeneratorBasedBuilder``)
under ``data_dir/jsonl_corpus/<name>/1.0.0`` as array_record files;
``load_jsonl_corpus`` / ``tfds_text_source`` read them (or any other prepared
tfds dataset with a text feature, e.g. ``pg19`` or ``c4`` in a user's
``data_dir``) through ``tfds.data_source``: random access, no TensorFlow.

Input: one JSON object per line in SlimPajama shape, ``{"text": ..., "meta":
{"redpajama_set_name": ...}}``. Features: ``text`` and ``source`` (strings);
the source is read from the dotted ``source_field`` (default
``meta.redpajama_set_name``).

Splits: ``train`` from ``train_files``; ``validation`` either from
``validation_files`` or, with ``validation_fraction`` > 0, the lines of
``train_files`` whose ``sha1(split_seed, raw line bytes without the line end)``
falls below the fraction
(identical lines land in the same split, so duplicates never leak across).
Within a split, tfds orders records by a hash of their key (``file:line``):
deterministic, not file order.

Bad input rules, each counted per split in the stats (``<dataset
dir>/metadata.json``, key ``build_stats``, and the return value of
``build_jsonl_corpus``); nothing is dropped without a counter:
  replaced_non_utf8  bytes that are not UTF-8 (or JSON escapes of lone
                     surrogates) become U+FFFD; the record is kept.
  invalid_json       a line that does not parse as JSON, or whose value is not
                     an object. ``on_invalid="count"`` (default) counts and
                     skips it; ``"error"`` raises ValueError naming file:line.
  invalid_record     an object without a string ``text``; same policy.
  skipped_empty      ``text`` empty or whitespace only: skipped.
  missing_source     the source field is absent or not a non-empty string: the
                     record gets ``default_source`` (``"unknown"``), or
                     ValueError naming file:line when ``strict_source=True``.
  blank_lines        whitespace-only lines (not records): skipped.
Every record, kept or not, is assigned to one split first, so the per-split
counters add up to the corpus totals; ``build_stats["files"]`` has the same
counters per input file (all splits), and ``data_quality`` condenses them to
what a run reports per file (skipped lines, repaired UTF-8).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from ctxjax.registry import unknown_choice

DATASET_NAME = "jsonl_corpus"
VERSION = "1.0.0"
DEFAULT_SOURCE = "unknown"
DEFAULT_SOURCE_FIELD = "meta.redpajama_set_name"
ON_INVALID = ("count", "error")
COUNTERS = ("records", "replaced_non_utf8", "invalid_json", "invalid_record",
            "skipped_empty", "missing_source", "blank_lines")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass(eq=False)
class JsonlCorpusConfig(tfds.core.BuilderConfig):
  """Which files make the corpus and how bad records are handled (see module doc)."""
  train_files: tuple[str, ...] = ()
  validation_files: tuple[str, ...] = ()
  validation_fraction: float = 0.0
  split_seed: int = 0
  source_field: str = DEFAULT_SOURCE_FIELD
  default_source: str = DEFAULT_SOURCE
  strict_source: bool = False
  on_invalid: str = "count"


def _check_config(cfg: JsonlCorpusConfig) -> None:
  if not cfg.train_files:
    raise ValueError("train_files is empty: name at least one JSONL file")
  if cfg.on_invalid not in ON_INVALID:
    raise ValueError(unknown_choice("on_invalid", cfg.on_invalid, ON_INVALID))
  if not 0.0 <= cfg.validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={cfg.validation_fraction} outside [0, 1)")
  if cfg.validation_files and cfg.validation_fraction:
    raise ValueError("give validation_files or validation_fraction, not both")
  if not cfg.source_field or not cfg.default_source:
    raise ValueError("source_field and default_source must be non-empty strings")
  for path in (*cfg.train_files, *cfg.validation_files):
    if not os.path.isfile(path):
      raise ValueError(f"JSONL file not found: {path}")


def _dotted(obj: Any, path: str) -> Any:
  """``obj["a"]["b"]`` for ``path="a.b"``; None when any step is missing."""
  for part in path.split("."):
    if not isinstance(obj, dict) or part not in obj:
      return None
    obj = obj[part]
  return obj


def _in_validation(raw: bytes, seed: int, fraction: float) -> bool:
  digest = hashlib.sha1(f"{seed}:".encode() + raw.rstrip(b"\r\n")).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def parse_records(files: Sequence[str], cfg: JsonlCorpusConfig, stats: dict[str, int],
                  keep=lambda raw: True, by_file: dict[str, dict[str, int]] | None = None
                  ) -> Iterator[tuple[str, dict[str, str]]]:
  """Yields ``(key, {"text", "source"})`` for the good lines of ``files``.

  ``keep(raw_line)`` selects this split's lines; only those are parsed and
  counted into ``stats`` (the COUNTERS, updated in place) and, per file, into
  ``by_file`` (``{path: COUNTERS}``, created as needed) when given.
  """
  by_file = {} if by_file is None else by_file
  for fi, path in enumerate(files):
    per_file = by_file.setdefault(path, dict.fromkeys(COUNTERS, 0))
    counters = (stats, per_file)
    with open(path, "rb") as f:
      for li, raw in enumerate(f, start=1):
        where = f"{path}:{li}"
        if not raw.strip():
          _count(counters, "blank_lines", int(keep(raw)))
          continue
        if not keep(raw):
          continue
        try:
          line, replaced = raw.decode("utf-8"), False
        except UnicodeDecodeError:
          line, replaced = raw.decode("utf-8", errors="replace"), True
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          obj, err = None, f"invalid JSON ({e.msg})"
        else:
          err = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
        if err is not None:
          if cfg.on_invalid == "error":
            raise ValueError(f"{where}: {err} (on_invalid='error')")
          _count(counters, "invalid_json")
          continue
        text = obj.get("text")
        if not isinstance(text, str):
          if cfg.on_invalid == "error":
            raise ValueError(f"{where}: no string 'text' field (on_invalid='error')")
          _count(counters, "invalid_record")
          continue
        source = _dotted(obj, cfg.source_field)
        if _SURROGATE.search(text) or (isinstance(source, str) and _SURROGATE.search(source)):
          text = _SURROGATE.sub("\ufffd", text)  # JSON "\udc80" escapes are not UTF-8 either
          source = _SURROGATE.sub("\ufffd", source) if isinstance(source, str) else source
          replaced = True
        _count(counters, "replaced_non_utf8", int(replaced))
        if not text.strip():
          _count(counters, "skipped_empty")
          continue
        if not isinstance(source, str) or not source:
          if cfg.strict_source:
            raise ValueError(f"{where}: no source at {cfg.source_field!r} (strict_source=True)")
          _count(counters, "missing_source")
          source = cfg.default_source
        _count(counters, "records")
        yield f"{fi:05d}:{li:09d}", {"text": text, "source": source}


def _count(counters: Sequence[dict[str, int]], key: str, n: int = 1) -> None:
  for c in counters:
    c[key] += n


def data_quality(build_stats: dict[str, Any], files: Sequence[str]) -> dict[str, dict[str, int]]:
  """Per input file: ``skipped_lines`` (invalid JSON, no string text, empty text),
  ``repaired_utf8`` (records whose non-UTF-8 bytes became U+FFFD), ``defaulted_source``
  and ``records`` kept. A corpus prepared before per-file counts existed reports its totals
  under the files joined by commas."""
  per_file = build_stats.get("files") or {",".join(files): build_stats["total"]}
  return {path: {"skipped_lines": c["invalid_json"] + c["invalid_record"] + c["skipped_empty"],
                 "repaired_utf8": c["replaced_non_utf8"],
                 "defaulted_source": c["missing_source"], "records": c["records"]}
          for path, c in per_file.items()}


class JsonlCorpus(tfds.core.GeneratorBasedBuilder):
  """SlimPajama-shaped JSONL files as a tfds dataset; configure with ``JsonlCorpusConfig``."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS: list[JsonlCorpusConfig] = []  # every corpus is a custom config
  # No code-side files (checksums, metadata). Also: tfds 4.9.10 resolves a
  # packaged builder's code_path through `importlib_resources`, which it declares
  # only for Python < 3.9 (ModuleNotFoundError on 3.11 without it).
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local SlimPajama-shaped JSONL corpus (ctxjax.data.tfds_jsonl).",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "source": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    cfg = self.builder_config
    _check_config(cfg)
    self._build_stats, self._file_stats = {}, {}
    if cfg.validation_files:
      plan = {"train": (cfg.train_files, lambda raw: True),
              "validation": (cfg.validation_files, lambda raw: True)}
    elif cfg.validation_fraction > 0:
      held = lambda raw: _in_validation(raw, cfg.split_seed, cfg.validation_fraction)
      plan = {"train": (cfg.train_files, lambda raw: not held(raw)),
              "validation": (cfg.train_files, held)}
    else:
      plan = {"train": (cfg.train_files, lambda raw: True)}
    return {split: self._generate_examples(split, files, keep)
            for split, (files, keep) in plan.items()}

  def _generate_examples(self, split, files, keep):
    stats = self._build_stats.setdefault(split, dict.fromkeys(COUNTERS, 0))
    yield from parse_records(files, self.builder_config, stats, keep, self._file_stats)
    if not stats["records"]:  # tfds would stop with a bare "No examples were yielded"
      raise ValueError(
          f"split {split!r} of corpus {self.builder_config.name!r} has no records "
          f"(counters: {stats}); check the files, or validation_fraction="
          f"{self.builder_config.validation_fraction} for a small corpus")
    # Runs once the split is written, before tfds saves metadata.json.
    self.info.metadata["build_stats"] = {
        "splits": self._build_stats,
        "total": {k: sum(s[k] for s in self._build_stats.values()) for k in COUNTERS},
        "files": self._file_stats,
        "config": {f.name: getattr(self.builder_config, f.name)
                   for f in dataclasses.fields(JsonlCorpusConfig)
                   if f.name not in ("release_notes", "supported_versions", "tags",
                                     "description", "version")},
    }


def build_jsonl_corpus(name: str, train_files: Sequence[str], *, data_dir: str,
                       **config: Any) -> dict[str, Any]:
  """Writes ``data_dir/jsonl_corpus/<name>/1.0.0`` (array_record); returns the build stats.

  ``config`` takes the other ``JsonlCorpusConfig`` fields. A dataset already
  prepared under that name is reused as is (tfds rule): build a changed corpus
  under a new name or data_dir.
  """
  cfg = JsonlCorpusConfig(name=name, train_files=tuple(train_files), **config)
  builder = JsonlCorpus(config=cfg, data_dir=data_dir,
                        file_format=tfds.core.FileFormat.ARRAY_RECORD)
  builder.download_and_prepare()
  return read_build_stats(name, data_dir=data_dir)


def dataset_dir(name: str, data_dir: str) -> str:
  return os.path.join(data_dir, DATASET_NAME, name, VERSION)


def read_build_stats(name: str, *, data_dir: str) -> dict[str, Any]:
  """The bad-input counters of a prepared corpus (see module doc)."""
  with open(os.path.join(dataset_dir(name, data_dir), "metadata.json"), encoding="utf-8") as f:
    return json.load(f)["build_stats"]


class TextSource:
  """Random access ``(text, source)`` over a tfds data source (``len``, ``[i]``)."""

  def __init__(self, data_source, text_feature: str, source_feature: str | None,
               source_name: str | None):
    self.data_source = data_source
    self.text_feature, self.source_feature = text_feature, source_feature
    self.source_name = source_name

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, i: int) -> tuple[str, str]:
    ex = self.data_source[i]
    text = _feature(ex, self.text_feature)
    src = self.source_name if self.source_feature is None else _feature(ex, self.source_feature)
    return text, src

  def __iter__(self) -> Iterator[tuple[str, str]]:
    return (self[i] for i in range(len(self)))


def _feature(example: dict, path: str) -> str:
  value = _dotted(example, path)
  if value is None:
    raise ValueError(f"feature {path!r} not in the dataset; it has: {_feature_paths(example)}")
  if isinstance(value, bytes):  # tfds stores Text as UTF-8; "replace" guards foreign writers
    return value.decode("utf-8", errors="replace")
  return str(value)


def _feature_paths(obj: Any, prefix: str = "") -> list[str]:
  """Dotted paths of the leaves of a nested example."""
  if not isinstance(obj, dict):
    return [prefix[:-1]]
  return [p for k, v in sorted(obj.items()) for p in _feature_paths(v, f"{prefix}{k}.")]


def tfds_text_source(name: str, *, split: str = "train", data_dir: str | None = None,
                     text_feature: str = "text", source_feature: str | None = None,
                     source_name: str | None = None) -> TextSource:
  """Any prepared tfds dataset with a text feature, e.g. ``name="pg19"``,
  ``text_feature="book_text"``, through ``tfds.data_source`` (array_record only).

  ``text_feature`` / ``source_feature`` may be dotted paths into nested
  features. Without ``source_feature`` every record's source is
  ``source_name`` (default: the dataset name before any ``/`` or ``:``).
  Pin the version (``"pg19:0.1.1"``) to read the prepared files without the
  dataset's own builder code.
  """
  ds = tfds.data_source(name, split=split, data_dir=data_dir)
  if source_feature is None and source_name is None:
    source_name = re.split(r"[/:]", name)[0]
  src = TextSource(ds, text_feature, source_feature, source_name)
  if len(src):
    src[0]  # fail at the boundary on a wrong feature name
  return src


def load_jsonl_corpus(name: str, *, data_dir: str, split: str = "train") -> TextSource:
  """A corpus written by ``build_jsonl_corpus``, as ``(text, source)`` pairs."""
  return tfds_text_source(f"{DATASET_NAME}/{name}:{VERSION}", split=split, data_dir=data_dir,
                          text_feature="text", source_feature="source")
