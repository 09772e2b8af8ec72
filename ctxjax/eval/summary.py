"""DIR/eval/summary.md: one markdown table per task of the evaluation JSONs, with the PNGs."""
from __future__ import annotations

from typing import Mapping

from ctxjax import storage


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def perplexity_table(res: Mapping) -> list[str]:
  sources = list(res["per_source"])
  head = ["length"] + [f"{s} ppl" for s in sources] + ["overall ppl", "tokens"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for L in res["lengths"]:
    row = [str(L)] + [_fmt(res["per_source"][s][str(L)]["ppl"]) for s in sources]
    row += [_fmt(res["overall"][str(L)]["ppl"]), str(res["overall"][str(L)]["tokens"])]
    lines.append("| " + " | ".join(row) + " |")
  return lines


def retrieval_table(res: Mapping) -> list[str]:
  head = ["depth \\ length"] + [str(L) for L in res["lengths"]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for d, row in zip(res["depths"], res["scores"]):
    lines.append("| " + " | ".join([f"{100 * d:.0f}%"] + [f"{v:.2f}" for v in row]) + " |")
  means = [sum(col) / len(col) for col in zip(*res["scores"])] if res["scores"] else []
  lines.append("| mean | " + " | ".join(f"{v:.2f}" for v in means) + " |")
  if res.get("haystack_repeated"):
    lines.append(f"\nThe haystack ({res['haystack_tokens']} tokens) was repeated to fill the "
                 f"longest prompt.")
  return lines


def compress_table(res: Mapping) -> list[str]:
  lines = ["| length | compressed | truncated | ratio |", "|---|---|---|---|"]
  for L, cell in res["per_length"].items():
    lines.append(f"| {L} | {cell['compressed']:.2f} | {cell['truncated']:.2f} | "
                 f"{cell['ratio']:.2f} |")
  return lines


def write_summary(path: str, name: str, train_length: int, results: Mapping[str, Mapping],
                  pngs: Mapping[str, str]) -> str:
  """`results`: task -> result JSON (kind from its keys); `pngs`: task -> relative PNG path."""
  out = [f"# Evaluation of {name}", "", f"Training length: {train_length} tokens.", ""]
  for task, res in results.items():
    if "per_source" in res:
      title = f"Perplexity vs length ({res['protocol']})"
      table = perplexity_table(res)
    elif "budget" in res:
      title = f"{res['task']}: compression vs truncation at {res['budget']} tokens"
      table = compress_table(res)
    else:
      title = f"{task} (mean score {_fmt(res['mean_score'])})"
      table = retrieval_table(res)
    out += [f"## {title}", "", *table, ""]
    if task in pngs:
      out += [f"![{task}]({pngs[task]})", ""]
  storage.write_text(path, "\n".join(out))
  return path
