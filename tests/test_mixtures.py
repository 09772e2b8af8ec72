"""Length-upsampling mixtures on a synthetic heavy-tailed corpus (numpy only, no model)."""

import json
import os

import ml_collections
import numpy as np
import pytest

from ctxjax.data import mixture_stats, mixtures

S, C = 256, 1024
# source -> (documents, lognormal mu, sigma): heavy-tailed lengths; long share by tokens
# 35% overall (web 2%, book 83%), like SlimPajama's ~30% at 4K in Fu et al.
SPEC = {"web": (900, 3.5, 0.8), "code": (500, 3.8, 1.1), "arxiv": (200, 4.4, 1.0),
        "book": (80, 4.8, 1.3)}


@pytest.fixture(scope="module")
def corpus():
  """Document i is ``np.full(n_i, i)``, so every output piece names its document."""
  rng = np.random.default_rng(0)
  docs, sources = [], []
  for name, (n, mu, sigma) in SPEC.items():
    for length in np.maximum(1, rng.lognormal(mu, sigma, n).astype(int)):
      docs.append(np.full(int(length), len(docs), np.int32))
      sources.append(name)
  return docs, sources


def _share(stats, part, name, key="token_share"):
  return stats[part]["sources"][name][key]


def _origin(result):
  """(source doc index, piece length) for every output piece."""
  return [(int(d[0]), len(d)) for d in result.docs]


def test_corpus_is_mostly_short_by_tokens(corpus):
  st = mixture_stats.length_stats([len(d) for d in corpus[0]], corpus[1], S)
  assert 0.3 < st["total"]["long_share"] < 0.4  # room to upsample to 0.7
  assert st["sources"]["web"]["long_share"] < st["sources"]["book"]["long_share"]


def test_length_stats_hand_computed():
  st = mixture_stats.length_stats([1, 2, 3, 4, 5, 8, 9, 4], ["a"] * 7 + ["b"], 4)
  a = st["sources"]["a"]
  # buckets (2^(k-1), 2^k]: 1 | 2 | 3,4 | 5,8 | 9
  assert a["length_histogram"] == {
      "1": {"documents": 1, "tokens": 1}, "2": {"documents": 1, "tokens": 2},
      "4": {"documents": 2, "tokens": 7}, "8": {"documents": 2, "tokens": 13},
      "16": {"documents": 1, "tokens": 9}}
  assert (a["documents"], a["tokens"], a["long_documents"], a["long_tokens"]) == (7, 32, 3, 22)
  assert a["long_share"] == 22 / 32 and a["token_share"] == 32 / 36
  assert st["total"]["tokens"] == 36 and st["sources"]["b"]["long_share"] == 0.0


@pytest.mark.parametrize("method", mixtures.METHODS)
def test_per_source_upsample_keeps_shares_and_reaches_long_share(corpus, method):
  cfg = dict(kind="per_source_upsample", short_threshold=S, target_context=C, long_share=0.7,
             upsample_method=method)
  res = mixtures.apply_mixture(*corpus, cfg, seed=0)
  st = res.stats
  for name in SPEC:
    before, after = _share(st, "before", name), _share(st, "after", name)
    assert abs(after - before) <= 0.01 * before, (name, before, after)
    assert _share(st, "after", name, "long_share") > _share(st, "before", name, "long_share")
  assert abs(st["after"]["total"]["long_share"] - 0.7) <= 0.02 * 0.7
  if method == "downsample_short":  # shorts sampled per source; the corpus shrinks
    keep = st["params"]["short_keep_probability"]
    assert all(0 <= k <= 1 for k in keep.values()) and keep["web"] < 1
    assert 0 < st["params"]["scale"] < 1
  else:
    assert st["params"]["scale"] > 1
  # The stats describe the returned documents.
  recount = mixture_stats.length_stats([len(d) for d in res.docs], res.sources, S)
  assert recount == st["after"]
  pieces = _origin(res)
  assert all(corpus[1][i] == s for (i, _), s in zip(pieces, res.sources))
  if method == "downsample_short":  # nothing repeated, pieces are document prefixes
    assert len({i for i, _ in pieces}) == len(pieces)
    assert st["counters"]["repeated_copies"] == 0
  else:  # long documents repeated; no short document kept twice
    shorts = [i for i, n in pieces if len(corpus[0][i]) <= S]
    assert len(shorts) == len(set(shorts)) and st["counters"]["repeated_copies"] > 0


def test_targets_are_met_exactly_in_tokens(corpus):
  res = mixtures.apply_mixture(*corpus, {"kind": "per_source_upsample", "short_threshold": S,
                                         "long_share": 0.75}, seed=3)
  for name, t in res.stats["targets"].items():
    want = round(t["long_tokens"]) + round(t["short_tokens"])
    assert _share(res.stats, "after", name, "tokens") == want


@pytest.mark.parametrize("method", mixtures.METHODS)
def test_global_upsample_same_rate_for_every_source(corpus, method):
  docs, sources = corpus
  res = mixtures.apply_mixture(docs, sources, dict(kind="global_upsample", short_threshold=S,
                                                   long_share=0.65, upsample_method=method),
                               seed=1)
  assert abs(res.stats["after"]["total"]["long_share"] - 0.65) <= 0.02 * 0.65
  pieces = _origin(res)
  long_in = {i for i, d in enumerate(docs) if len(d) > S}
  short_in = set(range(len(docs))) - long_in
  if method == "downsample_short":  # every long document once, whole; shorts sampled
    assert sorted(i for i, n in pieces if i in long_in) == sorted(long_in)
    assert all(n == len(docs[i]) for i, n in pieces if i in long_in)
    assert set(i for i, _ in pieces) < set(range(len(docs)))
  else:  # every short document once, whole; longs repeated
    assert sorted(i for i, n in pieces if i in short_in) == sorted(short_in)
    assert res.stats["params"]["long_repeat_factor"] > 1
  # One rate for every source, counted from the returned pieces: each source keeps
  # short_keep_probability of its short tokens (downsample_short) or repeats its long tokens
  # long_repeat_factor times (repeat_long), to the token (one rounding per source).
  params = res.stats["params"]
  rate, cls = ((params["short_keep_probability"], short_in) if method == "downsample_short"
               else (params["long_repeat_factor"], long_in))
  assert 0 < rate != 1
  for name in SPEC:
    members = [i for i in cls if sources[i] == name]
    before = sum(len(docs[i]) for i in members)
    after = sum(n for i, n in pieces if i in cls and sources[i] == name)
    assert before > 0 and abs(after - rate * before) <= 0.5, (name, after / before, rate)
  # Source shares drift towards long sources (the paper's caveat for `global`).
  assert _share(res.stats, "after", "book") > _share(res.stats, "before", "book")
  assert _share(res.stats, "after", "web") < _share(res.stats, "before", "web")


@pytest.mark.parametrize("method", mixtures.METHODS)
def test_upsample_sources_only_changes_named_sources(corpus, method):
  docs, sources = corpus
  named = ("book", "arxiv")
  res = mixtures.apply_mixture(docs, sources, dict(kind="upsample_sources", sources=named,
                                                   short_threshold=S, long_share=0.4,
                                                   upsample_method=method), seed=2)
  assert abs(res.stats["after"]["total"]["long_share"] - 0.4) <= 0.02 * 0.4
  for name in SPEC:
    out = [d for d, s in zip(res.docs, res.sources) if s == name]
    orig = [d for d, s in zip(docs, sources) if s == name]
    if name in named:
      assert (_share(res.stats, "after", name, "long_share")
              > _share(res.stats, "before", name, "long_share"))
    else:
      assert len(out) == len(orig) and all(np.array_equal(a, b) for a, b in zip(out, orig))


@pytest.mark.parametrize("kind,limit", [("cut_short", S), ("cut_long", C)])
def test_cut_mixtures_chunk_every_document(corpus, kind, limit):
  docs, sources = corpus
  res = mixtures.apply_mixture(docs, sources, {"kind": kind, "short_threshold": S,
                                               "target_context": C}, seed=0)
  assert max(len(d) for d in res.docs) == limit
  by_doc = {}
  for d in res.docs:
    by_doc.setdefault(int(d[0]), []).append(d)
  assert sorted(by_doc) == list(range(len(docs)))
  for i, pieces in by_doc.items():
    assert [len(p) for p in pieces] == [min(limit, len(docs[i]) - j)
                                        for j in range(0, len(docs[i]), limit)]
  assert res.stats["after"]["total"]["tokens"] == res.stats["before"]["total"]["tokens"]
  for name in SPEC:
    assert _share(res.stats, "after", name) == _share(res.stats, "before", name)
  if kind == "cut_short":
    assert res.stats["after"]["total"]["long_share"] == 0.0


def test_weight_zero_source_dropped_and_reported(corpus):
  docs, sources = corpus
  cfg = ml_collections.ConfigDict(dict(kind="per_source_upsample", short_threshold=S,
                                       long_share=0.7, source_weights={"web": 0.0, "book": 2.0}))
  res = mixtures.apply_mixture(docs, sources, cfg, seed=0)
  web = res.stats["before"]["sources"]["web"]
  assert res.stats["counters"]["dropped_sources"] == {
      "web": {"documents": web["documents"], "tokens": web["tokens"]}}
  assert "web" not in res.sources and "web" not in res.stats["after"]["sources"]
  kept = {n: SPEC[n] for n in SPEC if n != "web"}
  wtok = {n: (2.0 if n == "book" else 1.0) * _share(res.stats, "before", n, "tokens")
          for n in kept}
  for n in kept:
    want = wtok[n] / sum(wtok.values())
    assert abs(_share(res.stats, "after", n) - want) <= 0.01 * want


def test_deterministic_from_seed(corpus):
  cfg = {"kind": "per_source_upsample", "short_threshold": S, "long_share": 0.7}
  a = mixtures.apply_mixture(*corpus, cfg, seed=5)
  b = mixtures.apply_mixture(*corpus, cfg, seed=5)
  c = mixtures.apply_mixture(*corpus, cfg, seed=6)
  assert _origin(a) == _origin(b) and a.sources == b.sources and a.stats == b.stats
  assert _origin(a) != _origin(c)


def test_empty_and_enormous_documents_are_counted(corpus):
  docs, sources = corpus
  big = np.full(10 * C + 7, len(docs), np.int32)
  docs2 = list(docs) + [np.zeros(0, np.int32)] * 3 + [big]
  res = mixtures.apply_mixture(docs2, list(sources) + ["web"] * 3 + ["book"],
                               {"kind": "cut_long", "short_threshold": S, "target_context": C,
                                "max_doc_tokens": 2 * C}, seed=0)
  assert res.stats["counters"]["skipped_empty"] == 3
  assert res.stats["counters"]["split_enormous_documents"] == (
      1 + sum(len(d) > 2 * C for d in docs))
  assert res.stats["before"]["total"]["tokens"] == sum(map(len, docs)) + len(big)
  assert sum(len(d) for d in res.docs if d[0] == len(docs)) == len(big)


@pytest.mark.parametrize("cfg,match", [
    ({"kind": "upsample_everything"},
     r"data.mixture.kind='upsample_everything'; .*valid choices: \['cut_long'"),
    ({"kind": "cut_short", "shortthreshold": 3},
     "unknown config key data.mixture.shortthreshold; did you mean "
     "'data.mixture.short_threshold'"),
    ({"upsample_method": "magic"}, "data.mixture.upsample_method='magic'; valid choices"),
    ({"short_threshold": S, "long_share": 0.2}, "below the original long share"),
    ({"short_threshold": S, "long_share": 1.5}, r"long_share must be in \(0, 1\)"),
    ({"short_threshold": S, "target_context": 8}, "target_context=8 is below short_threshold"),
    ({"kind": "upsample_sources", "short_threshold": S}, "needs sources"),
    ({"kind": "upsample_sources", "sources": ["books"], "short_threshold": S},
     r"sources names \['books'\], not in the corpus"),
    ({"source_weights": {"wiki": 1.0}}, r"source_weights names \['wiki'\]"),
    ({"short_threshold": S, "source_weights": {"web": -1}}, "weights must be >= 0"),
])
def test_bad_config_errors_name_the_key(corpus, cfg, match):
  with pytest.raises(ValueError, match=match):
    mixtures.apply_mixture(*corpus, cfg, seed=0)


def test_unreachable_target_errors():
  docs = [np.ones(10, np.int32)] * 10 + [np.ones(500, np.int32)]
  srcs = ["short_only"] * 10 + ["long"]  # long share at most the share of "long": 500/600
  with pytest.raises(ValueError, match=r"cannot be reached .*at most 0\.8333"):
    mixtures.apply_mixture(docs, srcs, {"short_threshold": S, "long_share": 0.9}, seed=0)
  with pytest.raises(ValueError, match="6 documents but 5 sources"):
    mixtures.apply_mixture(docs[:6], srcs[:5], {}, seed=0)


def test_write_stats_json_and_png(corpus, tmp_path):
  res = mixtures.apply_mixture(*corpus, {"short_threshold": S, "long_share": 0.7}, seed=0)
  jpath, ppath = mixture_stats.write_stats(res.stats, str(tmp_path))
  with open(jpath) as f:
    assert json.load(f) == json.loads(json.dumps(res.stats))
  with open(ppath, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(ppath) > 10_000
  table = mixture_stats.format_table(res.stats)
  assert table.splitlines()[0].split()[0] == "source" and "total" in table
