"""Five published findings, each checked against a study's numbers by a stated rule.

Each check returns a `Finding`: the claim and its paper, the rule, the numbers it used, and a
verdict — "reproduced", "not reproduced" or "not measured" (an input is missing) — with the
likely reason when it does not reproduce. The rules are deliberately simple and printed in the
report, so a reader can disagree with a threshold and still read the numbers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

REPRODUCED, NOT_REPRODUCED, NOT_MEASURED = "reproduced", "not reproduced", "not measured"
DIRECTION_ONLY = "direction reproduced, size not"


@dataclasses.dataclass
class Finding:
  claim: str
  source: str
  rule: str
  verdict: str
  numbers: dict
  reason: str = ""


@dataclasses.dataclass
class Results:
  """What the checks read: ppl[model][length] (overall), retrieval[model] (mean over the
  tasks' grids), per_source_nll[model][source][length], train_length, extend_length,
  growlength: {run: {"seconds_to_target": s | None, "eval_loss": x}}, mixtures {name: model}."""
  ppl: dict
  retrieval: dict
  per_source_nll: dict
  train_length: int
  extend_length: int
  growlength: dict
  mixtures: dict


def _ppl(r: Results, model: str, length: int) -> float | None:
  return r.ppl.get(model, {}).get(length)


def _missing(*values) -> bool:
  return any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values)


def alibi_extrapolates(r: Results) -> Finding:
  top = max(L for m in r.ppl.values() for L in m) if r.ppl else None
  ratios = {}
  for scheme in ("alibi", "rope", "xpos", "learned"):
    a, b = _ppl(r, f"pretrain_{scheme}", r.train_length), _ppl(r, f"pretrain_{scheme}", top)
    ratios[scheme] = None if _missing(a, b) else b / a
  rule = (f"ppl({top}) / ppl({r.train_length}) <= 1.2 for ALiBi and >= 2 for RoPE and learned "
          "positions (no scaling, no fine-tuning); the direction alone: ALiBi < 1.1 <= RoPE, "
          "learned")
  f = Finding("ALiBi keeps perplexity flat beyond its training length while RoPE without "
              "scaling and learned positions blow up", "Press et al. 2022", rule, NOT_MEASURED,
              {f"ppl ratio {k}": v for k, v in ratios.items()})
  if _missing(ratios["alibi"], ratios["rope"], ratios["learned"]):
    return f
  alibi_ok = ratios["alibi"] <= 1.2
  others_ok = ratios["rope"] >= 2 and ratios["learned"] >= 2
  others_rise = min(ratios["rope"], ratios["learned"]) >= 1.1 > ratios["alibi"]
  f.verdict = (REPRODUCED if alibi_ok and others_ok else
               DIRECTION_ONLY if alibi_ok and others_rise else NOT_REPRODUCED)
  if f.verdict == DIRECTION_ONLY:
    f.reason = (f"ALiBi stays flat and RoPE / learned rise ({ratios['rope']:.2f}x, "
                f"{ratios['learned']:.2f}x at {top} tokens), but they do not blow up: a "
                "2-layer model trained for minutes leans on nearby tokens, so unseen "
                "positions cost it little (Press et al.'s models were 16-layer and trained "
                "far longer)")
  elif not others_ok:
    f.reason = ("the tiny models barely use distances beyond a few dozen tokens, so unseen "
                "positions cost little average perplexity")
  elif not alibi_ok:
    f.reason = "ALiBi's perplexity rose beyond its training length"
  return f


def interpolation_findings(r: Results) -> Finding:
  L, L2 = r.extend_length, 2 * r.extend_length
  n = {
      "PI fine-tuned": _ppl(r, "extend_pi", L), "YaRN fine-tuned": _ppl(r, "extend_yarn", L),
      "RoPE zero-shot": _ppl(r, "pretrain_rope", L), "PI zero-shot": _ppl(r, "zeroshot_pi", L),
      "YaRN zero-shot": _ppl(r, "zeroshot_yarn", L),
      f"dynamic NTK zero-shot @{L2}": _ppl(r, "zeroshot_dynamic_ntk", L2),
      f"RoPE zero-shot @{L2}": _ppl(r, "pretrain_rope", L2),
  }
  rule = (f"at {L} tokens: PI and YaRN fine-tuned < their zero-shot and < RoPE zero-shot; "
          f"YaRN zero-shot < PI zero-shot; at {L2}: dynamic NTK < plain RoPE")
  f = Finding("PI and YaRN recover long-context perplexity after a short fine-tune; YaRN "
              "zero-shot beats PI zero-shot; dynamic NTK beats plain RoPE zero-shot",
              "Chen et al. 2023; Peng et al. 2024", rule, NOT_MEASURED, n)
  if _missing(*n.values()):
    return f
  parts = {
      "fine-tunes recover": (n["PI fine-tuned"] < min(n["PI zero-shot"], n["RoPE zero-shot"])
                             and n["YaRN fine-tuned"] < min(n["YaRN zero-shot"],
                                                            n["RoPE zero-shot"])),
      "YaRN beats PI zero-shot": n["YaRN zero-shot"] < n["PI zero-shot"],
      "dynamic NTK beats RoPE": n[f"dynamic NTK zero-shot @{L2}"] < n[f"RoPE zero-shot @{L2}"],
  }
  f.numbers.update({f"holds: {k}": v for k, v in parts.items()})
  f.verdict = REPRODUCED if all(parts.values()) else NOT_REPRODUCED
  if not all(parts.values()):
    failed = [k for k, v in parts.items() if not v]
    f.reason = (f"fails: {', '.join(failed)}; plain RoPE hardly degrades beyond its length at "
                "this size, which leaves the scalings little to recover")
  return f


def longlora_close(r: Results) -> Finding:
  L = r.extend_length
  full, lora = _ppl(r, "extend_pi", L), _ppl(r, "extend_longlora", L)
  f = Finding("LongLoRA with trainable embeddings and norms comes close to full fine-tuning",
              "Chen et al. 2024", f"ppl({L}) of LongLoRA <= 1.10 x that of full fine-tuning "
              "(both PI, same steps)", NOT_MEASURED,
              {"full fine-tune (PI)": full, "LongLoRA": lora})
  if _missing(full, lora):
    return f
  f.numbers["ratio"] = lora / full
  f.verdict = REPRODUCED if lora <= 1.10 * full else NOT_REPRODUCED
  if f.verdict == NOT_REPRODUCED:
    f.reason = ("at this width a rank-8 adapter is a large share of the model and the "
                "fine-tune is a few dozen steps: LoRA's slower start dominates")
  return f


def per_source_balance(r: Results) -> Finding:
  """per_source_upsample should be best or tied-best on the mean rank over three criteria:
  long-context loss, short-context loss (both per-source means), and retrieval."""
  rows = {}
  for mix, model in r.mixtures.items():
    nll = r.per_source_nll.get(model, {})
    long_ = [v.get(r.extend_length) for v in nll.values()]
    short = [v.get(r.train_length) for v in nll.values()]
    rows[mix] = {"loss@long": None if not long_ or _missing(*long_) else sum(long_) / len(long_),
                 "loss@short": None if not short or _missing(*short) else sum(short) / len(short),
                 "retrieval": r.retrieval.get(model)}
  rule = ("mean rank over (per-source loss at the extension length, per-source loss at the "
          "pretraining length, retrieval score) is lowest for per_source_upsample (ties count)")
  f = Finding("Per-source length upsampling gives the best balance between long-context "
              "retrieval and per-domain loss", "Fu et al. 2024", rule, NOT_MEASURED,
              {"mixtures": rows})
  if not rows or any(_missing(*row.values()) for row in rows.values()):
    return f
  ranks = {m: 0.0 for m in rows}
  for key, better in (("loss@long", 1), ("loss@short", 1), ("retrieval", -1)):
    order = sorted(rows, key=lambda m: better * rows[m][key])
    for m in rows:  # tied values share the best rank
      ranks[m] += min(i for i, o in enumerate(order) if rows[o][key] == rows[m][key])
  mean = {m: v / 3 for m, v in ranks.items()}
  f.numbers["mean rank"] = mean
  best = min(mean.values())
  f.verdict = REPRODUCED if mean.get("per_source_upsample") == best else NOT_REPRODUCED
  if f.verdict == NOT_REPRODUCED:
    f.reason = ("retrieval is at chance for every mixture at this budget, so the balance rests "
                "on the losses alone" if len({row["retrieval"] for row in rows.values()}) == 1
                else "the mixtures differ by a few dozen training steps on a 6 MB corpus")
  return f


def growlength_faster(r: Results) -> Finding:
  g, fixed = r.growlength.get("growlength", {}), r.growlength.get("pretrain_rope", {})
  n = {"GrowLength s to target": g.get("seconds_to_target"),
       "fixed s to target": fixed.get("seconds_to_target"),
       "target train loss": fixed.get("target_loss"),
       "GrowLength eval loss": g.get("eval_loss"), "fixed eval loss": fixed.get("eval_loss")}
  f = Finding("GrowLength reaches a given loss in less wall time than fixed-length training",
              "Jin et al. 2023", "wall seconds until the training loss (at the full length) "
              "first reaches the fixed-length run's final loss, at least 10% less for "
              "GrowLength (two runs of one preset differed by up to 15% in these times: the "
              "workers share the cores)", NOT_MEASURED, n)
  if _missing(n["fixed s to target"], n["target train loss"]):
    return f
  gs = n["GrowLength s to target"]
  f.verdict = (REPRODUCED if gs is not None and gs <= 0.9 * n["fixed s to target"]
               else NOT_REPRODUCED)
  if f.verdict == NOT_REPRODUCED:
    f.reason = ("GrowLength never reached the target loss in its budget" if gs is None else
                "at 128 tokens attention is a small share of the step, so short stages save "
                "little time, and each stage pays a compile; the difference is within the "
                "noise of wall times measured beside another worker")
  return f


CHECKS: tuple[Callable[[Results], Finding], ...] = (
    alibi_extrapolates, interpolation_findings, longlora_close, per_source_balance,
    growlength_faster)


def check_all(r: Results) -> list[Finding]:
  return [check(r) for check in CHECKS]
