"""Accuracy at one token budget with and without prompt compression (LongLLMLingua, Jiang et
al. 2023, compare against truncation the same way).

For each sample (length L > budget, a depth) of passkey / needle: the question (the prompt's
fixed tail) is kept whole; the context before it is either
  compressed  by ctxjax/eval/compress.py to budget - len(question) tokens, or
  truncated   to its last budget - len(question) tokens (what a model with a window of
              `budget` tokens reads),
so both prompts have exactly `budget` tokens (+ bos). Both are generated greedily and scored
like the retrieval grid.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ctxjax.data import synthetic
from ctxjax.eval import compress as compress_lib
from ctxjax.eval import retrieval, scoring
from ctxjax.registry import Registry

# Task -> the prompt's tail (the question), which compression keeps whole.
QUESTIONS: Registry[str] = Registry("compress task")
QUESTIONS.add("passkey", synthetic.PASSKEY_QUESTION)
QUESTIONS.add("needle", synthetic.FU_TAIL.format(question=synthetic.FU_QUESTION))


def split_question(tok, task: str, prompt_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(context ids, question ids) of a synthetic prompt."""
  q = np.asarray(tok.encode(QUESTIONS.get(task)), np.int32)
  if not np.array_equal(prompt_ids[len(prompt_ids) - len(q):], q):
    raise ValueError(f"{task} prompt does not end with its question")
  return prompt_ids[:len(prompt_ids) - len(q)], q


def compression_eval(generate_fn: Callable, model, variables, tok, scorer, task: str,
                     lengths: Sequence[int], budget: int, *,
                     depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), samples: int = 1,
                     haystack: Sequence[str] | None = None, chunk_tokens: int = 64,
                     batch_size: int = 8, seed: int = 0, model_name: str = "",
                     progress: Callable | None = None) -> dict:
  """{task, budget, lengths, accuracy: {compressed, truncated}, per_length, samples}."""
  QUESTIONS.check(task)
  max_new = retrieval.MAX_NEW_TOKENS.get(task)
  hay = haystack if task in retrieval.HAYSTACK_TASKS else None
  eos = tok.eos_id if tok.eos_id >= 0 else None
  records, per_length = [], {}
  for li, length in enumerate(lengths):
    made = [synthetic.make_sample(task, tok, length=int(length), depth=float(d),
                                  seed=[seed, li, di, s], haystack=hay)
            for di, d in enumerate(depths) for s in range(samples)]
    prompts = {"compressed": [], "truncated": []}
    stats = []
    for m in made:
      context, question = split_question(tok, task, m.prompt_ids)
      keep = budget - len(question)
      if keep < 1:
        raise ValueError(f"budget={budget} leaves no context after the {len(question)}-token "
                         f"question")
      small, st = compress_lib.compress(scorer, context, question, keep, bos_id=tok.bos_id,
                                        chunk_tokens=chunk_tokens)
      stats.append(st)
      for kind, ctx in (("compressed", small), ("truncated", context[-keep:])):
        prompts[kind].append(np.concatenate([[tok.bos_id], ctx, question]).astype(np.int32))
    cell = {}
    for kind, rows in prompts.items():
      outs = []
      for b in range(0, len(rows), batch_size):
        outs += retrieval.generate_batch(generate_fn, model, variables,
                                         rows[b:b + batch_size], max_new, eos,
                                         pad_to=batch_size)
      results = [scoring.score(task, tok.decode(ids), m.answers) for ids, m in zip(outs, made)]
      cell[kind] = float(np.mean([r["score"] for r in results]))
      for m, ids, r, st in zip(made, outs, results, stats):
        records.append({"kind": kind, "length": int(length), "depth": m.metadata["depth"],
                        "answer": m.answer, "prediction": tok.decode(ids),
                        "ratio": st["ratio"], **r})
      if progress is not None:
        progress()
    cell["ratio"] = float(np.mean([s["ratio"] for s in stats]))
    per_length[str(int(length))] = cell
  acc = {k: float(np.mean([c[k] for c in per_length.values()]))
         for k in ("compressed", "truncated")}
  return {"task": task, "model": model_name, "budget": int(budget),
          "lengths": [int(x) for x in lengths], "depths": [float(d) for d in depths],
          "accuracy": acc, "per_length": per_length, "samples": records}
