"""The bundled demo corpus: real text already on the machine, in SlimPajama shape.

A fresh Debian-12 Python machine carries several megabytes of varied, real
text in three distinct domains, which is enough to train and evaluate the tiny
configs without downloading anything:

  code   Python standard-library ``.py`` files (``sysconfig`` stdlib path,
         ``site-packages`` excluded).
  docs   Perl POD / ``.pm`` documentation under ``/usr/share/perl*`` and vim
         help under ``/usr/share/vim*/*/doc``.
  legal  ``/usr/share/common-licenses`` plus ``/usr/share/doc/*/copyright``.

``build_demo_corpus`` writes ``demo.jsonl`` (one ``{"text", "meta":
{"redpajama_set_name"}}`` object per line, the SlimPajama shape the later
tfds builder and length-upsampling mixture read) and ``stats.json``.

Selection, per source (deterministic for a seed):
  * candidate files are globbed and sorted; symlinks resolving to the same file
    and byte-identical documents are kept once (``duplicates``);
  * files are grouped into length buckets (bytes: <1K, 1K-4K, 4K-20K,
    20K-100K, >=100K); one file from each bucket is taken first so every
    domain has both short and long documents, then the rest are taken in a
    seeded random order, so the length distribution stays natural;
  * a document is taken whole (never truncated) if it fits the per-source
    budget (``max_docs_per_source`` documents, ``max_bytes_per_source``
    UTF-8 bytes); files above ``max_doc_bytes`` are left out (``too_long``);
  * non-UTF-8 bytes are decoded with ``errors="replace"`` (the number of such
    documents is ``replaced_non_utf8``); whitespace-only files are skipped
    (``skipped_empty``).
The jsonl lists sources in ``SOURCES`` order and, within a source, documents
in sorted path order.

Command line: ``python -m ctxjax.data.corpus --out=DIR`` builds and prints the
stats.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from typing import Any, Mapping, Sequence

CORPUS_NAME = "demo-v1"  # bump when the selection rules change
JSONL_NAME = "demo.jsonl"
STATS_NAME = "stats.json"

# Histogram edges in characters; the label of bucket i is HIST_LABELS[i].
HIST_EDGES = (1_000, 4_000, 20_000, 100_000)
HIST_LABELS = ("<1K", "1K-4K", "4K-20K", "20K-100K", ">=100K")
# Selection buckets use the same edges, in bytes of the file on disk.
_EXCLUDED_PARTS = ("site-packages", "__pycache__")


def default_sources() -> dict[str, tuple[str, ...]]:
  """Source name -> glob patterns (``**`` recursive) for this machine."""
  stdlib = sysconfig.get_paths()["stdlib"]
  return {
      "code": (os.path.join(stdlib, "**", "*.py"),),
      "docs": (
          "/usr/share/perl*/**/*.pod",
          "/usr/share/perl*/**/*.pm",
          "/usr/share/vim*/*/doc/*.txt",
      ),
      "legal": (
          "/usr/share/common-licenses/*",
          "/usr/share/doc/*/copyright",
      ),
  }


def default_data_dir() -> str:
  """``$CTXJAX_DATA_DIR`` if set, else ``~/.cache/ctxjax``."""
  env = os.environ.get("CTXJAX_DATA_DIR")
  if env:
    return os.path.abspath(os.path.expanduser(env))
  return os.path.join(os.path.expanduser("~"), ".cache", "ctxjax")


def corpus_dir(data_dir: str | None = None) -> str:
  """Directory holding the demo corpus (and the tokenizer/token caches)."""
  return os.path.join(data_dir or default_data_dir(), CORPUS_NAME)


def length_bucket(n: int) -> int:
  """Index into HIST_LABELS for a length ``n``."""
  for i, edge in enumerate(HIST_EDGES):
    if n < edge:
      return i
  return len(HIST_EDGES)


def _candidates(patterns: Sequence[str]) -> list[tuple[str, int]]:
  """Sorted (path, size) of regular files matching ``patterns``, one per real file."""
  seen_real = set()
  out = []
  paths = sorted({p for pat in patterns for p in glob.glob(pat, recursive=True)})
  for path in paths:
    if any(part in _EXCLUDED_PARTS for part in path.split(os.sep)):
      continue
    if not os.path.isfile(path):
      continue
    real = os.path.realpath(path)
    if real in seen_real:
      continue
    seen_real.add(real)
    out.append((path, os.path.getsize(real)))
  return out


def _selection_order(cands: list[tuple[str, int]], rng: random.Random) -> list[tuple[str, int]]:
  """One file per length bucket first (short to long), then the rest shuffled."""
  order = list(cands)
  rng.shuffle(order)
  first, rest, seen_buckets = [], [], set()
  for item in order:
    b = length_bucket(item[1])
    if b not in seen_buckets and item[1] > 0:
      seen_buckets.add(b)
      first.append(item)
    else:
      rest.append(item)
  first.sort(key=lambda item: item[1])
  return first + rest


def _read_text(path: str) -> tuple[str, bool]:
  """File text and whether undecodable bytes were replaced."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8"), False
  except UnicodeDecodeError:
    return raw.decode("utf-8", errors="replace"), True


def _histogram(lengths: Sequence[int]) -> dict[str, int]:
  hist = {label: 0 for label in HIST_LABELS}
  for n in lengths:
    hist[HIST_LABELS[length_bucket(n)]] += 1
  return hist


def build_demo_corpus(
    out_dir: str,
    *,
    max_docs_per_source: int = 1000,
    max_bytes_per_source: int = 2_000_000,
    max_doc_bytes: int = 262_144,
    seed: int = 0,
    sources: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
  """Writes ``out_dir/demo.jsonl`` and ``out_dir/stats.json``; returns the stats.

  Args:
    out_dir: created if missing; existing files of the same name are replaced.
    max_docs_per_source: document cap per source.
    max_bytes_per_source: UTF-8 byte cap per source (documents are whole).
    max_doc_bytes: files larger than this on disk are not used.
    seed: selection seed.
    sources: name -> glob patterns; defaults to ``default_sources()``.

  Raises:
    ValueError: a cap is not positive, or no source has any document.
  """
  for key, val in (("max_docs_per_source", max_docs_per_source),
                   ("max_bytes_per_source", max_bytes_per_source),
                   ("max_doc_bytes", max_doc_bytes)):
    if val <= 0:
      raise ValueError(f"{key} must be > 0, got {val}")
  sources = dict(default_sources() if sources is None else sources)
  t0 = time.perf_counter()
  per_source: dict[str, dict[str, Any]] = {}
  records: list[tuple[str, str, str]] = []  # (source, path, text)
  missing: dict[str, list[str]] = {}
  seen_hash: set[bytes] = set()

  for name, patterns in sources.items():
    cands = _candidates(patterns)
    if not cands:
      missing[name] = list(patterns)
      continue
    rng = random.Random(f"{seed}:{name}")
    st = {"files_found": len(cands), "documents": 0, "characters": 0, "bytes": 0,
          "skipped_empty": 0, "replaced_non_utf8": 0, "duplicates": 0, "too_long": 0}
    chosen: list[tuple[str, str]] = []
    budget = max_bytes_per_source
    for path, size in _selection_order(cands, rng):
      if len(chosen) >= max_docs_per_source or budget <= 0:
        break
      if size > max_doc_bytes:
        st["too_long"] += 1
        continue
      if size > budget:  # cannot fit whole; a later, shorter file may
        continue
      text, replaced = _read_text(path)
      if not text.strip():
        st["skipped_empty"] += 1
        continue
      digest = hashlib.sha1(text.encode("utf-8")).digest()
      if digest in seen_hash:
        st["duplicates"] += 1
        continue
      nbytes = len(text.encode("utf-8"))
      if nbytes > budget:
        continue
      seen_hash.add(digest)
      st["replaced_non_utf8"] += int(replaced)
      budget -= nbytes
      chosen.append((path, text))
    if not chosen:
      missing[name] = list(patterns)
      continue
    chosen.sort(key=lambda pt: pt[0])
    lengths = [len(t) for _, t in chosen]
    st["documents"] = len(chosen)
    st["characters"] = sum(lengths)
    st["bytes"] = sum(len(t.encode("utf-8")) for _, t in chosen)
    st["min_chars"] = min(lengths)
    st["max_chars"] = max(lengths)
    st["length_histogram_chars"] = _histogram(lengths)
    per_source[name] = st
    records.extend((name, path, text) for path, text in chosen)

  if not per_source:
    raise ValueError(
        "no demo corpus source found on this machine; looked for "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in sources.items()))

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, JSONL_NAME), "w", encoding="utf-8") as f:
    for name, _, text in records:
      f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": name}},
                         ensure_ascii=False) + "\n")
  stats = {
      "corpus": CORPUS_NAME,
      "seed": seed,
      "max_docs_per_source": max_docs_per_source,
      "max_bytes_per_source": max_bytes_per_source,
      "max_doc_bytes": max_doc_bytes,
      "sources": per_source,
      "missing_sources": missing,
      "total": {
          "documents": sum(s["documents"] for s in per_source.values()),
          "characters": sum(s["characters"] for s in per_source.values()),
          "bytes": sum(s["bytes"] for s in per_source.values()),
          "skipped_empty": sum(s["skipped_empty"] for s in per_source.values()),
          "replaced_non_utf8": sum(s["replaced_non_utf8"] for s in per_source.values()),
          "duplicates": sum(s["duplicates"] for s in per_source.values()),
          "length_histogram_chars": _histogram(
              [len(t) for _, _, t in records]),
      },
  }
  with open(os.path.join(out_dir, STATS_NAME), "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2, sort_keys=False)
    f.write("\n")
  stats["build_seconds"] = round(time.perf_counter() - t0, 3)  # not written: varies
  return stats


def read_jsonl(path: str):
  """Yields (text, source) from a SlimPajama-shaped jsonl file."""
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        obj = json.loads(line)
        yield obj["text"], obj["meta"]["redpajama_set_name"]


def atomic_build_dir(final_dir: str, build_fn) -> str:
  """Runs ``build_fn(tmp_dir)`` and renames ``tmp_dir`` to ``final_dir``.

  If ``final_dir`` already exists (built earlier, or by a concurrent process
  that won the rename), nothing is built / the temporary copy is dropped.
  """
  if os.path.isdir(final_dir):
    return final_dir
  parent = os.path.dirname(os.path.abspath(final_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final_dir) + "-", dir=parent)
  try:
    build_fn(tmp)
    try:
      os.rename(tmp, final_dir)
    except OSError:
      if not os.path.isdir(final_dir):
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return final_dir


def ensure_demo_corpus(data_dir: str | None = None) -> str:
  """Builds the demo corpus once under ``data_dir`` (atomically); returns the jsonl path."""
  final = corpus_dir(data_dir)
  jsonl = os.path.join(final, JSONL_NAME)
  if os.path.isfile(jsonl):
    return jsonl
  if os.path.isdir(final):  # a directory without the corpus: not ours to guess
    raise ValueError(f"{final} exists but has no {JSONL_NAME}; remove it to rebuild")
  atomic_build_dir(final, lambda tmp: build_demo_corpus(tmp))
  return jsonl


def _format_stats(stats: Mapping[str, Any]) -> str:
  lines = []
  for name, st in stats["sources"].items():
    lines.append(
        f"{name:6s} docs={st['documents']:5d} chars={st['characters']:10,d} "
        f"MB={st['bytes'] / 1e6:6.2f} empty={st['skipped_empty']} "
        f"non_utf8={st['replaced_non_utf8']} dup={st['duplicates']} "
        f"too_long={st['too_long']} hist={st['length_histogram_chars']}")
  tot = stats["total"]
  lines.append(f"total  docs={tot['documents']:5d} chars={tot['characters']:10,d} "
               f"MB={tot['bytes'] / 1e6:6.2f}")
  for name, pats in stats["missing_sources"].items():
    lines.append(f"missing {name}: {', '.join(pats)}")
  if "build_seconds" in stats:
    lines.append(f"built in {stats['build_seconds']:.2f}s")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ctxjax.data.corpus",
      description="Build the bundled demo corpus (SlimPajama-shaped jsonl + stats.json).")
  parser.add_argument("--out", default=None,
                      help="output directory (default: <data_dir>/" + CORPUS_NAME + ")")
  parser.add_argument("--max_docs_per_source", type=int, default=1000)
  parser.add_argument("--max_bytes_per_source", type=int, default=2_000_000)
  parser.add_argument("--max_doc_bytes", type=int, default=262_144)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true", help="print the stats as JSON")
  args = parser.parse_args(argv)
  out = args.out or corpus_dir()
  try:
    stats = build_demo_corpus(
        out, max_docs_per_source=args.max_docs_per_source,
        max_bytes_per_source=args.max_bytes_per_source,
        max_doc_bytes=args.max_doc_bytes, seed=args.seed)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(stats, indent=2) if args.json else _format_stats(stats))
  print(f"wrote {os.path.join(out, JSONL_NAME)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
