"""Scorers of a model's continuation against the expected answer(s), each in [0, 1].

  passkey            Mohtashami & Jaggi (2023), landmark-attention run_test.py: the first
                     integer of the greedy continuation (re.search(r"\\d+")) equals the key.
  rouge1             Fu et al. (2024) score the needle continuation by ROUGE-1 F (their tables
                     show it x10); implemented here exactly as Google's rouge_score does it
                     without stemming (Lin 2004): lowercase, non [a-z0-9] -> space, whitespace
                     tokens, clipped unigram overlap, P, R, F1.
  contains           binary: the needle's key phrase occurs in the continuation.
  string_match_all   RULER (Hsieh et al. 2024): fraction of expected values found in the
                     output, case-insensitive.
  string_match_part  RULER: 1 if any expected value is found in the output.

Every scorer is `fn(prediction: str, answers: Sequence[str]) -> float`, registered in SCORERS.
"""
from __future__ import annotations

import collections
import re
from typing import Callable, Sequence

from ctxjax.registry import Registry

Scorer = Callable[[str, Sequence[str]], float]
SCORERS: Registry[Scorer] = Registry("scorer")

# The needle's key phrase: what "contains" looks for (Fu et al.'s needle sentence).
NEEDLE_KEY_PHRASE = "eat a sandwich and sit in Dolores Park"


def rouge_tokens(text: str) -> list[str]:
  """rouge_score's tokenizer (no stemming): lowercase, non-alphanumerics -> spaces."""
  return [t for t in re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower()))
          if re.fullmatch(r"[a-z0-9]+", t)]


def rouge1(target: str, prediction: str) -> dict[str, float]:
  """ROUGE-1 {precision, recall, fmeasure} of `prediction` against `target` (rouge_score's
  _score_ngrams: clipped unigram overlap over max(count, 1))."""
  want, have = (collections.Counter(rouge_tokens(t)) for t in (target, prediction))
  overlap = sum(min(n, have[w]) for w, n in want.items())
  precision = overlap / max(sum(have.values()), 1)
  recall = overlap / max(sum(want.values()), 1)
  f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return {"precision": precision, "recall": recall, "fmeasure": f}


@SCORERS.register("passkey")
def passkey_match(prediction: str, answers: Sequence[str]) -> float:
  """1 when the first integer of `prediction` equals the key (answers[0])."""
  m = re.search(r"\d+", prediction)
  return float(m is not None and int(m.group()) == int(answers[0]))


@SCORERS.register("rouge1")
def rouge1_f(prediction: str, answers: Sequence[str]) -> float:
  """ROUGE-1 F of `prediction` against the needle sentence (answers[0]); x10 in Fu et al."""
  return rouge1(answers[0], prediction)["fmeasure"]


@SCORERS.register("contains")
def contains_key_phrase(prediction: str, answers: Sequence[str],
                        phrase: str = NEEDLE_KEY_PHRASE) -> float:
  """1 when the key phrase (the needle's, else answers[0] itself) is in `prediction`."""
  key = phrase if phrase.lower() in answers[0].lower() else answers[0]
  return float(key.lower() in prediction.lower())


@SCORERS.register("string_match_all")
def string_match_all(prediction: str, answers: Sequence[str]) -> float:
  """RULER's string_match_all for one prediction: fraction of `answers` it contains."""
  low = prediction.lower()
  return sum(a.lower() in low for a in answers) / len(answers)


@SCORERS.register("string_match_part")
def string_match_part(prediction: str, answers: Sequence[str]) -> float:
  """RULER's string_match_part for one prediction: 1 if it contains any of `answers`."""
  low = prediction.lower()
  return float(max(a.lower() in low for a in answers))


# Task -> (primary scorer (the grid's), further scorers recorded per sample).
TASK_SCORERS: Registry[tuple[str, tuple[str, ...]]] = Registry("task")
TASK_SCORERS.add("passkey", ("passkey", ()))
TASK_SCORERS.add("needle", ("rouge1", ("contains",)))
for _task in ("niah_single", "niah_multikey", "niah_multiquery"):
  TASK_SCORERS.add(_task, ("string_match_all", ()))
TASK_SCORERS.add("niah_multivalue", ("string_match_all", ("string_match_part",)))


def score(task: str, prediction: str, answers: Sequence[str]) -> dict[str, float]:
  """{"score": primary score, <scorer name>: value for every scorer of `task`}."""
  primary, extra = TASK_SCORERS.get(task)
  out = {name: SCORERS.get(name)(prediction, answers) for name in (primary,) + extra}
  out["score"] = out[primary]
  if primary == "rouge1":
    out["rouge1_x10"] = 10.0 * out["rouge1"]  # Fu et al.'s 0-10 scale
  return out
