"""Length statistics of a document mixture and their report: per source and total, documents,
tokens, token share, long share and a log2 length histogram (the paper's length x domain view,
Fu et al. 2024, Fig. 2), written as ``mixture_stats.json`` + ``mixture_stats.png``.

ctxjax/data/mixtures.py computes them before and after a mixture."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from ctxjax import storage

STATS_JSON, STATS_PNG = "mixture_stats.json", "mixture_stats.png"
# -- statistics ------------------------------------------------------------------

def _log2_bucket(n: np.ndarray) -> np.ndarray:
  """ceil(log2(n)) for n >= 1: bucket k holds lengths in (2^(k-1), 2^k], so a
  power-of-two short_threshold is a bucket edge (long = more than it)."""
  return np.ceil(np.log2(np.maximum(n, 1))).astype(int)


def _group_stats(lengths: np.ndarray, threshold: int, total_tokens: int) -> dict[str, Any]:
  tokens = int(lengths.sum())
  long_tokens = int(lengths[lengths > threshold].sum())
  hist = {}
  buckets = _log2_bucket(lengths)
  for k in np.unique(buckets):
    sel = buckets == k
    hist[str(2**int(k))] = {"documents": int(sel.sum()), "tokens": int(lengths[sel].sum())}
  return {
      "documents": int(len(lengths)),
      "tokens": tokens,
      "token_share": tokens / total_tokens if total_tokens else 0.0,
      "long_documents": int((lengths > threshold).sum()),
      "long_tokens": long_tokens,
      "long_share": long_tokens / tokens if tokens else 0.0,
      "length_histogram": hist,  # upper edge 2^k -> counts of lengths in (2^(k-1), 2^k]
  }


def length_stats(lengths: Sequence[int], sources: Sequence[str],
                 short_threshold: int) -> dict[str, Any]:
  """Per source and total: documents, tokens, token share, long share, log2 histogram."""
  lengths = np.asarray(lengths, np.int64)
  src = np.asarray(sources, dtype=object)
  total = int(lengths.sum())
  return {
      "sources": {name: _group_stats(lengths[src == name], short_threshold, total)
                  for name in sorted(set(sources))},
      "total": _group_stats(lengths, short_threshold, total),
  }




# -- reporting -------------------------------------------------------------------

def format_table(stats: Mapping[str, Any]) -> str:
  """Per-source before -> after: documents, tokens, token share, long share."""
  b, a = stats["before"]["sources"], stats["after"]["sources"]
  rows = [f"{'source':<12} {'docs':>13} {'tokens':>21} {'token share':>15} {'long share':>15}"]
  empty = {"documents": 0, "tokens": 0, "token_share": 0.0, "long_share": 0.0}
  for name in sorted(set(b) | set(a)) + ["total"]:
    x = stats["before"]["total"] if name == "total" else b.get(name, empty)
    y = stats["after"]["total"] if name == "total" else a.get(name, empty)
    rows.append(
        f"{name:<12} {x['documents']:>6}->{y['documents']:<6} "
        f"{x['tokens']:>10}->{y['tokens']:<10} "
        f"{x['token_share']:>7.4f}->{y['token_share']:<7.4f} "
        f"{x['long_share']:>7.4f}->{y['long_share']:<7.4f}")
  return "\n".join(rows)


def write_stats(stats: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
  """Writes ``mixture_stats.json`` and ``mixture_stats.png``; returns their paths."""
  storage.makedirs(out_dir)
  jpath, ppath = storage.join(out_dir, STATS_JSON), storage.join(out_dir, STATS_PNG)
  storage.write_text(jpath, json.dumps(stats, indent=2) + "\n")
  plot_stats(stats, ppath)
  return jpath, ppath


def plot_stats(stats: Mapping[str, Any], path: str) -> None:
  """Per source, the share of its tokens in each log2 length bucket, before vs after
  (like the paper's length x domain figure); the title gives token and long shares."""
  import matplotlib  # lazy: only reporting needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = sorted(set(stats["before"]["sources"]) | set(stats["after"]["sources"])) + ["total"]
  edges = sorted({int(k) for part in ("before", "after")
                  for g in [*stats[part]["sources"].values(), stats[part]["total"]]
                  for k in g["length_histogram"]})
  fig, axes = plt.subplots(len(names), 1, figsize=(max(6, 0.5 * len(edges) + 2), 2.2 * len(names)),
                           squeeze=False)
  x = np.arange(len(edges))
  for ax, name in zip(axes[:, 0], names):
    for off, part, color in ((-0.2, "before", "0.6"), (0.2, "after", "tab:blue")):
      g = stats[part]["total"] if name == "total" else stats[part]["sources"].get(name)
      hist = g["length_histogram"] if g else {}
      tokens = np.asarray([hist.get(str(e), {}).get("tokens", 0) for e in edges], float)
      share = tokens / tokens.sum() if tokens.sum() else tokens
      ax.bar(x + off, share, width=0.4, color=color, label=part)
    # bar i holds (edges[i] / 2, edges[i]]: a threshold S sits log2(S / edges[0]) + 0.5 in
    ax.axvline(np.log2(stats["config"]["short_threshold"] / edges[0]) + 0.5, color="k",
               lw=0.8, ls="--")
    b = stats["before"]["total"] if name == "total" else stats["before"]["sources"].get(name, {})
    a = stats["after"]["total"] if name == "total" else stats["after"]["sources"].get(name, {})
    ax.set_title(f"{name}: token share {b.get('token_share', 0):.3f} -> "
                 f"{a.get('token_share', 0):.3f}, long share {b.get('long_share', 0):.3f} -> "
                 f"{a.get('long_share', 0):.3f}", fontsize=9)
    ax.set_ylabel("token share")
    ax.set_xticks(x, [f"<=2^{int(np.log2(e))}" for e in edges], fontsize=7)
  axes[0, 0].legend(fontsize=8)
  axes[-1, 0].set_xlabel(f"document length (tokens, log2 buckets); dashed: short_threshold="
                         f"{stats['config']['short_threshold']}")
  fig.suptitle(f"{stats['kind']} (seed {stats['seed']})")
  fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.8 / fig.get_figheight(),
                      bottom=0.6 / fig.get_figheight(), hspace=0.55)  # tight_layout: +1 s
  storage.save_figure(fig, path, dpi=100)
  plt.close(fig)
