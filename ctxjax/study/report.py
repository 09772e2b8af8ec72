"""The study's report: DIR/report/README.md, PNGs and results.json, from the finished items.

Everything is read back from the items' outputs (runs/*/summary.json, metrics.jsonl,
done.json; evals/*/ppl.json, passkey.json, needle.json), so the report can be rewritten at any
time (`--report_only`) and shows "not measured" for what has not finished.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import numpy as np

from ctxjax import storage
from ctxjax.study import findings as findings_lib
from ctxjax.study import item as item_lib
from ctxjax.study import plan as plan_lib


def _read(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _metrics(path: str) -> list[dict]:
  try:
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]
  except OSError:
    return []


def machine() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                  if ln.startswith("Model name")), platform.processor())
  except (OSError, subprocess.SubprocessError):
    model = platform.processor() or platform.machine()
  return f"{os.cpu_count()} CPU cores ({model}), Python {platform.python_version()}"


def training_curve(rows: list[dict]) -> list[tuple[float, float, int]]:
  """[(elapsed seconds, train loss, seq_len)] per logged step; elapsed is rebuilt from each
  window's tokens / tokens_per_sec (compiles included, as they are in the first window)."""
  out, elapsed, prev = [], 0.0, 0
  for r in rows:
    if "loss" not in r or not r.get("tokens_per_sec"):
      continue
    tokens = max(0, r["step"] - prev) * r["batch_size"] * r["seq_len"]  # a resume repeats steps
    elapsed += tokens / r["tokens_per_sec"]
    prev = r["step"]
    out.append((elapsed, r["loss"], r["seq_len"]))
  return out


def seconds_to(curve, target: float, seq_len: int, window: int = 3) -> float | None:
  """First elapsed time at which the moving mean of `window` logged losses at `seq_len`
  reaches `target`."""
  pts = [(t, x) for t, x, n in curve if n == seq_len]
  for i in range(window - 1, len(pts)):
    if np.mean([x for _, x in pts[i - window + 1:i + 1]]) <= target:
      return pts[i][0]
  return None


def growlength_numbers(workdir: str, full_len: int) -> dict:
  runs = item_lib.runs_dir(workdir)
  fixed = training_curve(_metrics(os.path.join(runs, "pretrain_rope", "metrics.jsonl")))
  grow = training_curve(_metrics(os.path.join(runs, "growlength", "metrics.jsonl")))
  out = {}
  if not fixed:
    return out
  target = float(np.mean([x for _, x, _ in fixed[-3:]]))
  for name, curve in (("pretrain_rope", fixed), ("growlength", grow)):
    summary = _read(os.path.join(runs, name, "summary.json")) or {}
    out[name] = {"target_loss": target, "seconds_to_target": seconds_to(curve, target, full_len)
                 if curve else None, "total_seconds": curve[-1][0] if curve else None,
                 "eval_loss": summary.get("eval_loss")}
  return out


def collect(workdir: str, study, items: list[plan_lib.Item]) -> dict:
  ppl, per_source, retrieval, grids, ppl_raw = {}, {}, {}, {}, {}
  for it in items:
    if it.kind != "eval":
      continue
    where = item_lib.out_dir(workdir, it)
    res = _read(os.path.join(where, "ppl.json"))
    if res:
      ppl_raw[it.model] = res
      ppl[it.model] = {int(L): v["ppl"] for L, v in res["overall"].items()}
      per_source[it.model] = {s: {int(L): v["nll"] for L, v in t.items()}
                              for s, t in res["per_source"].items()}
    scores = []
    for task in study.eval.tasks:
      grid = _read(os.path.join(where, f"{task}.json"))
      if grid:
        grids.setdefault(task, {})[it.model] = grid
        scores.append(grid["mean_score"])
    retrieval[it.model] = float(np.mean(scores)) if scores else None
  return {"ppl": ppl, "per_source_nll": per_source, "retrieval": retrieval, "grids": grids,
          "ppl_raw": ppl_raw}


def _fmt(v, digits=3) -> str:
  if v is None:
    return "—"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
  return str(v)


def _table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _ppl_plot(collected, models, path, train_lengths) -> str | None:
  from ctxjax.eval import plots  # noqa: PLC0415
  results = [collected["ppl_raw"][m] for m in models if m in collected["ppl_raw"]]
  if not results:
    return None
  lengths = [train_lengths.get(r["model"]) for r in results]
  plots.perplexity_plot(results, path, lengths)
  return os.path.basename(path)


def _heatmap_grid(grids: dict, task: str, path: str) -> str | None:
  from ctxjax.eval import plots  # noqa: PLC0415
  if not grids:
    return None
  plots.retrieval_heatmap_grid(list(grids.values()), path, f"{task}: score over length (x) and "
                               "depth (y); dashed = training length")
  return os.path.basename(path)


def write_report(workdir: str, study, items: list[plan_lib.Item]) -> str:
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  c = collect(workdir, study, items)
  train_len, ext_len = int(study.pretrain_len), int(study.pretrain_len) * int(study.factor)
  mixtures = {m: plan_lib.mixture_run(study, m) for m in study.mixtures}
  growth = growlength_numbers(workdir, train_len)
  results = findings_lib.Results(c["ppl"], c["retrieval"], c["per_source_nll"], train_len,
                                 ext_len, growth, mixtures)
  found = findings_lib.check_all(results)

  runs, total_wall = [], 0.0
  for it in items:
    done = _read(os.path.join(item_lib.out_dir(workdir, it), item_lib.DONE)) or {}
    total_wall += done.get("wall_sec", 0.0)
    if it.kind == "train":
      s = _read(os.path.join(item_lib.out_dir(workdir, it), "summary.json")) or {}
      rows = _metrics(os.path.join(item_lib.out_dir(workdir, it), "metrics.jsonl"))
      tokens = sum(max(0, r["step"] - p["step"]) * r["batch_size"] * r["seq_len"]
                   for p, r in zip([{"step": 0}] + rows, rows) if "loss" in r)
      runs.append([it.model, it.group, s.get("steps"), s.get("seq_len"), tokens or None,
                   done.get("wall_sec"), s.get("eval_loss")])
  train_lengths = {it.model: (ext_len if it.group in ("extend", "mixture") else train_len)
                   for it in items}
  lengths = list(study.eval.ppl_lengths)
  groups = {
      "schemes": [f"pretrain_{s}" for s in study.schemes],
      "extensions": ["pretrain_rope"] + [f"extend_{m}" for m in study.extensions]
                    + [f"zeroshot_{m}" for m in study.zero_shot],
      "mixtures": list(mixtures.values()),
  }
  plots = {g: _ppl_plot(c, ms, os.path.join(out, f"ppl_{g}.png"), train_lengths)
           for g, ms in groups.items()}
  heatmaps = {t: _heatmap_grid(c["grids"].get(t, {}), t, os.path.join(out, f"{t}.png"))
              for t in study.eval.tasks}

  sessions = _metrics(os.path.join(workdir, "sessions.jsonl"))
  wall = sum(s["wall_sec"] for s in sessions)
  md = [f"# Context-extension study — preset `{study.preset}`", "",
        f"Machine: {machine()}. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Wall time {wall / 60:.1f} min in {len(sessions)} session(s) of "
        f"`python -m ctxjax.study` (workers at once: "
        f"{', '.join(str(s['parallel']) for s in sessions) or '—'}); the items took "
        f"{total_wall / 60:.1f} min of worker time. Config: `study.json`; logs: `logs/`.", "",
        "## Findings", "",
        _table(["finding", "paper", "verdict"], [[f.claim, f.source, f"**{f.verdict}**"]
                                                 for f in found]), ""]
  for f in found:
    md += [f"- **{f.source}** — {f.verdict}. Rule: {f.rule}. Numbers: "
           + "; ".join(f"{k} = {_fmt(v) if not isinstance(v, dict) else json.dumps(v, default=_fmt)}"
                       for k, v in f.numbers.items())
           + (f". Likely reason: {f.reason}." if f.reason else ".")]
  md += ["", "## Perplexity vs length (held-out demo text, non-overlapping windows)", "",
         _table(["model", "trained at"] + [str(n) for n in lengths],
                [[m, train_lengths.get(m)] + [c["ppl"][m].get(n) for n in lengths]
                 for m in c["ppl"]]), ""]
  md += [f"![{g}]({p})" for g, p in plots.items() if p]
  md += ["", "## Retrieval (mean score per length; grids of length x depth)", ""]
  for task, grids in c["grids"].items():
    lens = sorted({n for g in grids.values() for n in g["lengths"]})
    md += [f"**{task}**", "", _table(["model"] + [str(n) for n in lens] + ["mean"], [
        [m] + [float(np.mean(np.asarray(g["scores"])[:, g["lengths"].index(n)]))
               if n in g["lengths"] else None for n in lens] + [g["mean_score"]]
        for m, g in grids.items()]), ""]
    if heatmaps.get(task):
      md += [f"![{task}]({heatmaps[task]})", ""]
  sources = sorted({s for m in mixtures.values() for s in c["per_source_nll"].get(m, {})})
  md += ["## Data ablation (Fu et al. 2024): per-source loss and retrieval", "",
         f"Each mixture continually pretrains `pretrain_rope` with `{study.ablation_method}` "
         f"for the same steps and tokens at {ext_len} tokens. Loss = nats/token on held-out "
         f"text at {train_len} (short) and {ext_len} (long) tokens; `pretrain_rope` is the "
         "original mixture.", "",
         _table(["mixture"] + [f"{s}@{n}" for n in (train_len, ext_len) for s in sources]
                + ["retrieval"],
                [[mix] + [c["per_source_nll"].get(m, {}).get(s, {}).get(n)
                          for n in (train_len, ext_len) for s in sources]
                 + [c["retrieval"].get(m)] for mix, m in
                 [("original (pretrain_rope)", "pretrain_rope")] + list(mixtures.items())]), ""]
  md += ["## GrowLength vs fixed length (Jin et al. 2023)", "",
         _table(["run", "target train loss", "s to target", "total s", "eval loss"],
                [[k, v["target_loss"], v["seconds_to_target"], v["total_seconds"],
                  v["eval_loss"]] for k, v in growth.items()]), "",
         "## Runs", "",
         _table(["run", "group", "steps", "final length", "tokens", "wall s", "eval loss"],
                runs), ""]
  path = os.path.join(out, "README.md")
  storage.write_text(path, "\n".join(md))
  record = {k: v for k, v in c.items() if k not in ("grids", "ppl_raw")}
  record.update(findings=[f.__dict__ for f in found], growlength=growth, runs=runs,
                machine=machine(), preset=study.preset, wall_sec=wall, sessions=sessions)
  storage.write_text(os.path.join(out, "results.json"),
                     json.dumps(record, indent=1, default=str))
  return path
