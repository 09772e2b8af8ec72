"""Length-upsampling mixtures of Fu et al. (2024, "Data Engineering for Scaling
Language Models to 128K Context"), on tokenized documents.

``apply_mixture(token_docs, sources, cfg, seed=...)`` returns the documents of
one mixture with per-source statistics before and after. A document is *long*
when it has more than ``short_threshold`` tokens (the paper's 4K; 256 on CPU);
``long_share`` is the share of tokens in long documents. ``cfg["kind"]``:

  cut_short            the original mixture, documents cut into pieces of at
                       most ``short_threshold`` tokens (a 4K-context baseline).
  cut_long             the original mixture, cut at ``target_context``.
  global_upsample      long documents upsampled regardless of source (the
                       paper's ``global``): source shares drift towards the
                       sources with long documents.
  per_source_upsample  the paper's choice: within each source, short documents
                       are down-sampled so the long share reaches ``long_share``
                       while every source keeps its original token share.
  upsample_sources     only the named ``sources`` get their long documents
                       upsampled; the other sources' documents are unchanged.
The upsampling kinds leave documents whole (packing cuts rows at seq_len).

How a target is reached (``upsample_method``):
  downsample_short (default; the paper's mechanism) - short documents are kept
    with a probability p < 1, long documents always. Fu et al. draw a fixed
    token budget from a corpus far larger than it (``slimpajama_packing.py``:
    per-source budget = total x mix, shorts kept with probability 0.1); here the
    corpus is the budget, so the result is smaller than the input.
    per_source_upsample keeps every source's share with one budget scale a in
    (0, 1]: source s gets a T_s tokens, as many of them long as it has
    (min(L_s, a T_s)), the rest short; the largest a (the most data) whose
    overall long share reaches the target is used. The paper's one keep
    probability for every source would, in a finite corpus, let the source with
    the fewest long documents cap every budget (on tests/test_mixtures.py's
    corpus at 70%: 9% of the tokens kept, against 36% here), so the keep
    probability is per source (``params.short_keep_probability``).
  repeat_long - every short document is kept once and long documents are
    repeated (copies), so no data is thrown away; for small corpora.
    per_source_upsample grows every source by one scale a >= 1 (a source with
    shorts but no long documents then stops with an error).
Targets are in tokens and exact: for each source and length class a permutation
seeded by (seed, source, class) gives the order, ``k`` full passes plus a prefix
of the order fill the target, and the last document is cut to fit
(``truncated_documents``; a cut long document may become short, so realised
long shares can fall short of the target by a few threshold-lengths of tokens).
Streams are independent per source: one source's selection does not depend on
the others.

``source_weights`` (optional, name -> weight) multiply a source's tokens before
the mixture (w > 1 repeats its documents, w < 1 samples them), so its share of
the original mixture becomes w_s T_s / sum w T: the paper's
``upsample_code_arxiv_book`` is per_source_upsample with weights on those
sources. Weight 0 drops the source, reported in ``counters.dropped_sources``.

Bad input, each counted in ``stats["counters"]``: empty token documents
(``skipped_empty``), weight-0 sources (``dropped_sources``), documents above
``max_doc_tokens`` cut into pieces before the mixture
(``split_enormous_documents``, so one enormous document cannot be repeated or
kept whole as a unit). An unreachable target, a target below the original
long share, or an unknown source name stops with a ValueError.

Command line: ``python -m ctxjax.data.mixtures --kind=per_source_upsample
--short_threshold=256 --target_context=1024 --out=DIR`` runs on the demo corpus
and writes ``mixture_stats.json`` and ``mixture_stats.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import zlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ctxjax.data.mixture_stats import format_table, length_stats, write_stats
from ctxjax.data.settings import unknown_key
from ctxjax.registry import Registry, unknown_choice

METHODS = ("downsample_short", "repeat_long")
DEFAULTS = {
    "kind": "per_source_upsample",
    "short_threshold": 4096,
    "target_context": 131072,
    "long_share": 0.7,
    "sources": (),
    "source_weights": None,
    "upsample_method": "downsample_short",
    "max_doc_tokens": None,
}


@dataclasses.dataclass
class MixtureResult:
  docs: list[np.ndarray]
  sources: list[str]
  stats: dict[str, Any]


# -- configuration -------------------------------------------------------------

def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """``cfg`` (dict or ConfigDict) over DEFAULTS, validated; errors name the key."""
  keys = list(cfg.keys())
  unknown = sorted(set(keys) - set(DEFAULTS))
  if unknown:
    raise ValueError(unknown_key("data.mixture", unknown[0], DEFAULTS))
  c = dict(DEFAULTS)
  c.update({k: cfg[k] for k in keys})
  MIXTURES.check(c["kind"])
  if c["upsample_method"] not in METHODS:
    raise ValueError(unknown_choice("data.mixture.upsample_method", c["upsample_method"],
                                    METHODS))
  c["short_threshold"], c["target_context"] = int(c["short_threshold"]), int(c["target_context"])
  if c["short_threshold"] < 1:
    raise ValueError(f"short_threshold must be >= 1, got {c['short_threshold']}")
  if c["target_context"] < c["short_threshold"]:
    raise ValueError(f"target_context={c['target_context']} is below "
                     f"short_threshold={c['short_threshold']}")
  c["long_share"] = float(c["long_share"])
  if not 0.0 < c["long_share"] < 1.0:
    raise ValueError(f"long_share must be in (0, 1), got {c['long_share']}")
  c["sources"] = tuple(c["sources"] or ())
  if c["kind"] == "upsample_sources" and not c["sources"]:
    raise ValueError("kind='upsample_sources' needs sources (the names to upsample)")
  weights = dict(c["source_weights"] or {})
  for name, w in weights.items():
    if not float(w) >= 0.0:
      raise ValueError(f"source_weights[{name!r}]={w}; weights must be >= 0")
  c["source_weights"] = {k: float(v) for k, v in weights.items()}
  if c["max_doc_tokens"] is not None:
    c["max_doc_tokens"] = int(c["max_doc_tokens"])
    if c["max_doc_tokens"] < 1:
      raise ValueError(f"max_doc_tokens must be >= 1, got {c['max_doc_tokens']}")
  return c


# -- targets per source: (long tokens, short tokens) ------------------------------
# Each mixture maps the weighted original amounts (long_s, short_s) to target
# amounts; _realise turns targets into documents.

def _original_share(lo, sh) -> float:
  total = sum(lo.values()) + sum(sh.values())
  return sum(lo.values()) / total


def _check_above_original(lo, sh, cfg) -> None:
  orig = _original_share(lo, sh)
  if cfg["long_share"] < orig - 1e-12:
    raise ValueError(
        f"long_share={cfg['long_share']} is below the original long share {orig:.4f} "
        f"(documents > short_threshold={cfg['short_threshold']} tokens): nothing to "
        f"upsample; raise long_share or short_threshold")


def _unreachable(cfg, best: float, why: str) -> ValueError:
  return ValueError(f"long_share={cfg['long_share']} cannot be reached with "
                    f"upsample_method={cfg['upsample_method']!r}: {why} (at most {best:.4f})")


def _cut(chunk_key: str):
  def mixture(lo, sh, cfg):
    return {s: (lo[s], sh[s]) for s in lo}, {}, cfg[chunk_key]
  return mixture


def _global_upsample(lo, sh, cfg):
  _check_above_original(lo, sh, cfg)
  L, Lo, Sh = cfg["long_share"], sum(lo.values()), sum(sh.values())
  if Lo == 0:
    raise _unreachable(cfg, 0.0, "the corpus has no long documents")
  if cfg["upsample_method"] == "downsample_short":
    p = min(1.0, Lo * (1 - L) / (L * Sh)) if Sh else 1.0
    return {s: (lo[s], p * sh[s]) for s in lo}, {"short_keep_probability": p}, None
  r = max(1.0, L * Sh / ((1 - L) * Lo))
  return {s: (r * lo[s], sh[s]) for s in lo}, {"long_repeat_factor": r}, None


def _bisect_largest(ok, lo=0.0, hi=1.0) -> float:
  """Largest x in [lo, hi] with ok(x), for ok true on [lo, root] and false after."""
  if ok(hi):
    return hi
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return lo


def _per_source_upsample(lo, sh, cfg):
  # Every source s keeps its share: it gets a T_s tokens for one scale a. Fu et al.
  # keep shorts with one probability in every source and stop each source at its
  # budget, in a corpus far larger than the budget; in a finite corpus that rule
  # lets the source with the fewest long documents cap the whole budget, so here
  # each source keeps as many long tokens as fit and fills up with shorts.
  _check_above_original(lo, sh, cfg)
  L = cfg["long_share"]
  tot = {s: lo[s] + sh[s] for s in lo}
  T = sum(tot.values())
  if cfg["upsample_method"] == "repeat_long":
    a = max(1.0, sum(sh.values()) / ((1 - L) * T))  # shorts kept once, longs repeated
    need = [s for s in lo if lo[s] == 0 and a * tot[s] - sh[s] > 0.5]
    if need:
      raise _unreachable(cfg, _original_share(lo, sh), f"sources {need} have no long "
                         "documents to repeat (use downsample_short or weight 0)")
    targets = {s: (a * tot[s] - sh[s], sh[s]) for s in lo}
    return targets, {"scale": a}, None
  best = sum(tot[s] for s in lo if lo[s] > 0) / T  # the share as a -> 0
  if L > best - 1e-9:
    raise _unreachable(cfg, best, "sources without long documents stay short")
  # Long tokens kept minus the target, a concave function of a: the root is the
  # largest a (the most data kept) whose long share reaches L.
  excess = lambda a: sum(min(lo[s], a * tot[s]) for s in lo) - L * a * T
  a = _bisect_largest(lambda a: excess(a) >= 0, 1e-12, 1.0)
  targets = {s: (min(lo[s], a * tot[s]), a * tot[s] - min(lo[s], a * tot[s])) for s in lo}
  keep = {s: targets[s][1] / sh[s] if sh[s] else 1.0 for s in lo}
  return targets, {"scale": a, "short_keep_probability": keep}, None


def _upsample_sources(lo, sh, cfg):
  _check_above_original(lo, sh, cfg)
  L, named = cfg["long_share"], set(cfg["sources"]) & set(lo)  # weight-0 sources are gone
  T, Lo = sum(lo.values()) + sum(sh.values()), sum(lo.values())
  lo_n = sum(lo[s] for s in named)
  sh_n = sum(sh[s] for s in named)
  if cfg["upsample_method"] == "downsample_short":
    best = Lo / (T - sh_n) if T > sh_n else 0.0  # every short of the named sources dropped
    if L > best + 1e-12:
      raise _unreachable(cfg, best, f"only the shorts of {sorted(named)} can be dropped")
    p = 1.0 - (T - Lo / L) / sh_n if sh_n else 1.0
    p = min(1.0, max(0.0, p))
    return ({s: (lo[s], p * sh[s] if s in named else sh[s]) for s in lo},
            {"short_keep_probability": p}, None)
  if lo_n == 0:
    raise _unreachable(cfg, _original_share(lo, sh), f"{sorted(named)} have no long documents")
  r = max(1.0, (L * (T - lo_n) - (Lo - lo_n)) / ((1 - L) * lo_n))
  return ({s: (r * lo[s] if s in named else lo[s], sh[s]) for s in lo},
          {"long_repeat_factor": r}, None)


# name -> fn(long_tokens by source, short_tokens by source, cfg)
#         -> (targets {source: (long, short)}, parameters, chunk length or None)
MIXTURES: Registry[Callable] = Registry("data.mixture.kind")
MIXTURES.add("cut_short", _cut("short_threshold"))
MIXTURES.add("cut_long", _cut("target_context"))
MIXTURES.add("global_upsample", _global_upsample)
MIXTURES.add("per_source_upsample", _per_source_upsample)
MIXTURES.add("upsample_sources", _upsample_sources)


# -- realisation -----------------------------------------------------------------

def _take(lengths: np.ndarray, target: int, rng: np.random.Generator):
  """Pieces ``(member, tokens)`` filling ``target`` tokens exactly (see module doc)."""
  total = int(lengths.sum())
  if target <= 0 or total == 0:
    return [], 0
  full, rest = divmod(int(target), total)
  pieces = [(i, int(n)) for _ in range(full) for i, n in enumerate(lengths)]
  truncated = 0
  if rest:
    for i in rng.permutation(len(lengths)):
      n = int(lengths[i])
      if n > rest:
        pieces.append((int(i), rest))
        truncated = 1
        break
      pieces.append((int(i), n))
      rest -= n
      if rest == 0:
        break
  return pieces, truncated


def _rng(seed: int, source: str, length_class: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), zlib.crc32(source.encode("utf-8")), length_class])


def apply_mixture(token_docs: Sequence[np.ndarray], sources: Sequence[str], cfg, *,
                  seed: int) -> MixtureResult:
  """The ``cfg["kind"]`` mixture of ``token_docs`` (ids without bos/eos); see module doc.

  Output documents are views into the inputs (repeats share memory), in input
  order (copies adjacent), with their sources; ``stats`` holds ``before``,
  ``after`` (see ``length_stats``), ``targets``, ``params`` and ``counters``.
  """
  c = resolve_config(cfg)
  if len(token_docs) != len(sources):
    raise ValueError(f"{len(token_docs)} documents but {len(sources)} sources")
  S = c["short_threshold"]
  counters = {"skipped_empty": 0, "split_enormous_documents": 0, "dropped_sources": {},
              "truncated_documents": 0, "repeated_copies": 0}
  docs, srcs = [], []
  for d, s in zip(token_docs, sources):
    d, s = np.asarray(d).reshape(-1), str(s)
    if d.size == 0:
      counters["skipped_empty"] += 1
      continue
    m = c["max_doc_tokens"]
    if m is not None and d.size > m:
      counters["split_enormous_documents"] += 1
      docs.extend(d[j:j + m] for j in range(0, d.size, m))
      srcs.extend([s] * -(-d.size // m))
    else:
      docs.append(d)
      srcs.append(s)
  if not docs:
    raise ValueError("no non-empty documents to mix")
  lengths = np.asarray([d.size for d in docs], np.int64)
  src = np.asarray(srcs, dtype=object)
  names = sorted(set(srcs))
  for key, listed in (("source_weights", c["source_weights"]), ("sources", c["sources"])):
    unknown = sorted(set(listed) - set(names))
    if unknown:
      raise ValueError(f"{key} names {unknown}, not in the corpus; its sources: {names}")
  before = length_stats(lengths, srcs, S)

  weights = {s: c["source_weights"].get(s, 1.0) for s in names}
  for s in names:
    if weights[s] == 0.0:
      st = before["sources"][s]
      counters["dropped_sources"][s] = {"documents": st["documents"], "tokens": st["tokens"]}
  kept = [s for s in names if weights[s] > 0]
  if not kept:
    raise ValueError("source_weights give every source weight 0")
  is_long = lengths > S
  lo = {s: weights[s] * lengths[(src == s) & is_long].sum() for s in kept}
  sh = {s: weights[s] * lengths[(src == s) & ~is_long].sum() for s in kept}
  targets, params, chunk = MIXTURES[c["kind"]](lo, sh, c)

  pieces = []  # (doc index, copy, tokens)
  for s in kept:
    for cls, members in ((0, np.flatnonzero((src == s) & is_long)),
                         (1, np.flatnonzero((src == s) & ~is_long))):
      got, trunc = _take(lengths[members], int(round(targets[s][cls])), _rng(seed, s, cls))
      counters["truncated_documents"] += trunc
      copies: dict[int, int] = {}
      for m, n in got:
        copies[m] = copies.get(m, 0) + 1
        pieces.append((int(members[m]), copies[m] - 1, n))
      counters["repeated_copies"] += sum(k - 1 for k in copies.values())
  pieces.sort()
  out_docs, out_src = [], []
  for i, _, n in pieces:
    d = docs[i][:n]
    step = chunk or n
    out_docs.extend(d[j:j + step] for j in range(0, n, step))
    out_src.extend([srcs[i]] * -(-n // step))
  after = length_stats([d.size for d in out_docs], out_src, S)
  wsum = sum(lo[s] + sh[s] for s in kept)
  stats = {
      "kind": c["kind"],
      "seed": int(seed),
      "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()},
      "params": params,
      "chunk_tokens": chunk,
      "targets": {s: {"long_tokens": float(targets[s][0]), "short_tokens": float(targets[s][1]),
                      "weighted_original_share": float((lo[s] + sh[s]) / wsum)} for s in kept},
      "before": before,
      "after": after,
      "counters": counters,
  }
  return MixtureResult(out_docs, out_src, stats)


# -- command line ------------------------------------------------------------------

def _parse_weights(text: str) -> dict[str, float]:
  out = {}
  for item in filter(None, text.split(",")):
    name, _, w = item.partition("=")
    out[name] = float(w)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  from ctxjax.data import corpus as corpus_lib
  from ctxjax.data import demo
  from ctxjax.data import tokenizer as tokenizer_lib

  p = argparse.ArgumentParser(prog="python -m ctxjax.data.mixtures",
                              description="Apply a length-upsampling mixture to the demo "
                              "corpus and write its statistics (JSON + PNG).")
  p.add_argument("--kind", default=DEFAULTS["kind"], choices=list(MIXTURES))
  p.add_argument("--short_threshold", type=int, default=256)
  p.add_argument("--target_context", type=int, default=1024)
  p.add_argument("--long_share", type=float, default=DEFAULTS["long_share"])
  p.add_argument("--sources", default="", help="comma-separated (upsample_sources)")
  p.add_argument("--source_weights", default="", help="name=weight,... (0 drops a source)")
  p.add_argument("--upsample_method", default=DEFAULTS["upsample_method"], choices=METHODS)
  p.add_argument("--max_doc_tokens", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--vocab_size", type=int, default=1024)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  tok = tokenizer_lib.ensure_demo_tokenizer(args.data_dir, args.vocab_size)
  ids, offsets, sources = demo.load_or_tokenize(corpus_lib.ensure_demo_corpus(args.data_dir), tok)
  docs = [ids[offsets[i]:offsets[i + 1]] for i in range(len(sources))]
  cfg = {k: getattr(args, k) for k in ("kind", "short_threshold", "target_context",
                                        "long_share", "upsample_method", "max_doc_tokens")}
  cfg["sources"] = tuple(filter(None, args.sources.split(",")))
  cfg["source_weights"] = _parse_weights(args.source_weights)
  try:
    result = apply_mixture(docs, sources, cfg, seed=args.seed)
  except ValueError as e:  # still show the corpus, so the user can pick a reachable target
    before = length_stats([len(d) for d in docs], sources, args.short_threshold)
    for name, st in [*before["sources"].items(), ("total", before["total"])]:
      print(f"{name:<12} docs={st['documents']} tokens={st['tokens']} "
            f"token_share={st['token_share']:.4f} long_share={st['long_share']:.4f}")
    print(f"error: {e}", file=sys.stderr)
    return 2
  jpath, ppath = write_stats(result.stats, args.out)
  print(format_table(result.stats))
  print(f"params: {json.dumps(result.stats['params'])}")
  print(f"counters: {json.dumps(result.stats['counters'])}")
  print(f"wrote {jpath} and {ppath}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
