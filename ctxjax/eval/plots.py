"""Figures of the evaluation JSONs (matplotlib, Agg backend: no display needed).

  retrieval_heatmap  Fu et al. (2024) Fig. 1: x = context length, y = needle depth 0% (top) to
                     100% (bottom), red (0) -> green (1), each cell annotated, a dashed vertical
                     line at the training length, the mean score in the title.
  retrieval_heatmap_grid  the same for several models side by side.
  perplexity_plot    perplexity (log y) vs context length (log2 x), one line per model, a
                     dashed vertical line at each model's training length.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ctxjax import storage


def _pyplot():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def _boundary(lengths: Sequence[int], train_length: int) -> float:
  """x coordinate (cell index space) of the training length between/at the columns."""
  lengths = np.asarray(lengths, float)
  return float(np.interp(np.log2(train_length), np.log2(lengths), np.arange(len(lengths))))


def _draw_heatmap(ax, result: Mapping, train_length: int | None, fontsize: int) -> float:
  """One retrieval grid on `ax` (cells red -> green, a dashed line at the training length);
  returns its mean score."""
  from matplotlib.colors import LinearSegmentedColormap  # noqa: PLC0415
  scores = np.asarray(result["scores"], float)
  lengths, depths = result["lengths"], result["depths"]
  cmap = LinearSegmentedColormap.from_list("fu2024", ["#F0496E", "#EBB839", "#0CD79F"])
  ax.imshow(scores, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
  ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=fontsize)
  ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=fontsize)
  if train_length and len(lengths) > 1 and min(lengths) <= train_length <= max(lengths):
    ax.axvline(_boundary(lengths, train_length), color="k", linestyle="--", linewidth=1)
  return float(scores.mean()) if scores.size else float("nan")


def retrieval_heatmap(result: Mapping, path: str, train_length: int | None = None) -> str:
  """Writes the heatmap of a retrieval_grid result to `path`; returns `path`."""
  plt = _pyplot()
  scores = np.asarray(result["scores"], float)
  fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.9 * len(result["lengths"])),
                                  1.4 + 0.45 * len(result["depths"])))
  mean = _draw_heatmap(ax, result, train_length, fontsize=10)
  for i in range(scores.shape[0]):
    for j in range(scores.shape[1]):
      ax.text(j, i, f"{scores[i, j]:.2f}", ha="center", va="center", fontsize=7)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  ax.set_title(f"{result['task']} {result.get('model', '')}\nmean score {mean:.3f}",
               fontsize=10)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)
  return path


def retrieval_heatmap_grid(results: Sequence[Mapping], path: str, title: str) -> str:
  """Several models' retrieval grids side by side (four per row), each titled with its
  model and mean score, each dashed at its result's `train_length`; returns `path`."""
  plt = _pyplot()
  cols = min(4, len(results))
  rows = -(-len(results) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
  for ax in axes.flat[len(results):]:
    ax.axis("off")
  for ax, result in zip(axes.flat, results):
    mean = _draw_heatmap(ax, result, result.get("train_length"), fontsize=7)
    ax.set_title(f"{result.get('model', '')} ({mean:.2f})", fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=110)
  plt.close(fig)
  return path


def perplexity_plot(results: Sequence[Mapping], path: str,
                    train_lengths: Sequence[int | None] | None = None,
                    source: str | None = None) -> str:
  """Writes perplexity vs length of one or more perplexity_vs_length results (`overall`, or
  per_source[source]) to `path`; returns `path`."""
  from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: PLC0415
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  ticks, values = set(), []
  train_lengths = list(train_lengths or [None] * len(results))
  for k, (res, train) in enumerate(zip(results, train_lengths)):
    table = res["overall"] if source is None else res["per_source"][source]
    pts = [(int(L), v["ppl"]) for L, v in table.items() if v["ppl"] is not None]
    pts.sort()
    ticks.update(p[0] for p in pts)
    values += [p[1] for p in pts]
    color = f"C{k}"
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color,
              label=res.get("model") or f"model {k}")
    if train:
      ax.axvline(train, color=color, linestyle="--", linewidth=1)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  if ticks:
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
  plain = FuncFormatter(lambda v, _: f"{v:.4g}")
  ax.yaxis.set_major_formatter(plain)
  # Within one decade only minor ticks fall inside the axis: label them then, not otherwise.
  narrow = bool(values) and max(values) < 10 * min(values)
  ax.yaxis.set_minor_formatter(plain if narrow else NullFormatter())
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("perplexity")
  ax.set_title("perplexity vs length" + (f" ({source})" if source else ""))
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)
  return path
