"""Retrieval grids: accuracy over context length x needle depth for the synthetic tasks of
ctxjax/data/synthetic.py (passkey: Mohtashami & Jaggi 2023; needle: Fu et al. 2024; RULER's
niah_*: Hsieh et al. 2024).

Each cell (length L, depth d) holds `samples` prompts of exactly L tokens (+ bos), seeded by
(seed, cell, sample); they are generated greedily in batches of one length, the new tokens
decoded and scored by ctxjax/eval/scoring.py. The generator is injected:
`generate_fn(model, variables, prompt_tokens, max_new_tokens, *, temperature, top_p, seed,
prompt_lengths, eos_id) -> int32 [batch, prompt + new]` (ctxjax.eval.generate.generate), so a
scripted stand-in tests the harness.

A haystack with fewer tokens than a length is cycled by synthetic.py; that is recorded as
"haystack_repeated": true (and said once on stdout), since repeated text makes the needle
easier to spot than in real long text.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ctxjax.data import synthetic
from ctxjax.eval import scoring
from ctxjax.registry import Registry

DEFAULT_DEPTHS = tuple(round(0.1 * i, 1) for i in range(11))
# New tokens to generate per task: the key (~5 digits) / the needle sentence / 1-4 values.
MAX_NEW_TOKENS: Registry[int] = Registry("task")
MAX_NEW_TOKENS.add("passkey", 8)
for _task in ("needle", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
  MAX_NEW_TOKENS.add(_task, 32)
# Tasks whose filler is real text (a haystack); passkey keeps its repeated garbage.
HAYSTACK_TASKS = ("needle", "niah_single", "niah_multikey", "niah_multivalue",
                  "niah_multiquery")


def check_task(task: str) -> str:
  return scoring.TASK_SCORERS.check(task)


def min_length(tok, task: str, haystack: Sequence[str] | None = None) -> int:
  """Tokens of `task`'s prompt without filler (header, needles, question) for `tok`."""
  hay = haystack if task in HAYSTACK_TASKS else None
  s = synthetic.make_sample(task, tok, length=1 << 14, depth=0.5, seed=0, haystack=hay)
  return int(s.metadata["length"] - s.metadata["filler_tokens"])


def haystack_tokens(tok, haystack: Sequence[str] | None) -> int | None:
  return None if haystack is None else sum(len(tok.encode(t)) for t in haystack)


def new_tokens(rows_BT: np.ndarray, prompt_len: int, eos_id: int | None) -> list[list[int]]:
  """The generated ids after `prompt_len`, cut at the first eos."""
  out = []
  for row in np.asarray(rows_BT)[:, prompt_len:].tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id)]
    out.append(row)
  return out


def generate_batch(generate_fn: Callable, model, variables, prompts: Sequence[np.ndarray],
                   max_new_tokens: int, eos_id: int | None,
                   pad_to: int | None = None) -> list[list[int]]:
  """Greedy continuations (new ids) of the prompts, right-padded to the longest (generate's
  `prompt_lengths`); the batch is filled up to `pad_to` rows with copies of the first prompt
  (one compiled shape per batch and longest prompt)."""
  rows = [np.asarray(p, np.int32) for p in prompts]
  rows += rows[:1] * max(0, (pad_to or 0) - len(rows))
  width = max(len(r) for r in rows)
  batch = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    batch[i, :len(r)] = r
  out = generate_fn(model, variables, batch, max_new_tokens, temperature=0.0, top_p=1.0,
                    seed=0, prompt_lengths=np.array([len(r) for r in rows], np.int32),
                    eos_id=eos_id)
  return new_tokens(out, width, eos_id)[:len(prompts)]


def retrieval_grid(generate_fn: Callable, model, variables, tok, task: str,
                   lengths: Sequence[int], depths: Sequence[float] = DEFAULT_DEPTHS, *,
                   samples: int = 1, haystack: Sequence[str] | None = None,
                   batch_size: int = 8, max_new_tokens: int | None = None, seed: int = 0,
                   model_name: str = "", progress: Callable | None = None,
                   echo: Callable[[str], None] = print, mix_lengths: bool = False) -> dict:
  """{task, model, lengths, depths, scores[depth][len], metrics[name][depth][len], samples,
  haystack_repeated}; scores are the mean primary score of the cell's samples (in [0, 1]).
  Batches hold one length each, or with `mix_lengths` prompts of every length right-padded
  to the longest (one compiled program for the whole grid: fewer compiles, more padding)."""
  check_task(task)
  max_new = max_new_tokens or MAX_NEW_TOKENS.get(task)
  hay = haystack if task in HAYSTACK_TASKS else None
  hay_tokens = haystack_tokens(tok, hay)
  repeated = hay_tokens is not None and hay_tokens < max(lengths)
  if repeated:
    echo(f"{task}: the haystack has {hay_tokens} tokens, fewer than length {max(lengths)}: "
         f"it is repeated")
  eos = tok.eos_id if tok.eos_id >= 0 else None
  scores = np.zeros((len(depths), len(lengths)))
  metrics: dict[str, np.ndarray] = {}
  records = []
  cells = [(li, di, s) for li in range(len(lengths)) for di in range(len(depths))
           for s in range(samples)]
  groups = [cells] if mix_lengths else [[c for c in cells if c[0] == li]
                                        for li in range(len(lengths))]
  for group in groups:
    for b in range(0, len(group), batch_size):
      chunk = group[b:b + batch_size]
      made = [synthetic.make_sample(task, tok, length=int(lengths[li]), depth=float(depths[di]),
                                    seed=[seed, li, di, s], haystack=hay)
              for li, di, s in chunk]
      prompts = [np.concatenate([[tok.bos_id], m.prompt_ids]) for m in made]
      outs = generate_batch(generate_fn, model, variables, prompts, max_new, eos,
                            pad_to=batch_size)
      for (li, di, s), m, ids in zip(chunk, made, outs):
        prediction = tok.decode(ids)
        result = scoring.score(task, prediction, m.answers)
        scores[di, li] += result["score"] / samples
        for name, value in result.items():
          metrics.setdefault(name, np.zeros_like(scores))[di, li] += value / samples
        records.append({"length": int(lengths[li]), "depth": float(depths[di]), "sample": s,
                        "answer": m.answer, "prediction": prediction, **result})
        if progress is not None:
          progress()
  return {"task": task, "model": model_name, "lengths": [int(x) for x in lengths],
          "depths": [float(d) for d in depths], "scores": scores.tolist(),
          "mean_score": float(scores.mean()) if scores.size else None,
          "metrics": {k: v.tolist() for k, v in metrics.items() if k != "score"},
          "haystack_repeated": bool(repeated), "haystack_tokens": hay_tokens,
          "max_new_tokens": max_new, "samples_per_cell": samples, "samples": records}
