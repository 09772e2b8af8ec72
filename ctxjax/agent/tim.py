"""One Think-in-Memory turn (Liu et al. 2023): before answering, recall the
thoughts nearest the query (not the raw history); after answering, "post-think": distil new
thoughts from the query and answer and insert them.

  answer, recalled = turn(memory, query, answer_fn, think_fn)

answer_fn(query, recalled thought texts) -> answer (the model via `generate`, or scripted);
think_fn(query, answer) -> thoughts (statements or (head, relation, tail) triples); optional
`forget` (a predicate) and `merge` (True or a merge function) reorganise the memory after the
insert, as the paper's post-thinking stage does.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ctxjax.agent.thoughts import Thought, ThoughtMemory, merge_texts


def turn(memory: ThoughtMemory, query: str, answer_fn: Callable[[str, list[str]], str],
         think_fn: Callable[[str, str], Sequence[Thought]], *, k: int = 3,
         forget: Callable[[dict], bool] | None = None,
         merge: bool | Callable[[Sequence[str]], str] = False) -> tuple[str, list[dict]]:
  recalled = memory.retrieve(query, k)
  answer = answer_fn(query, [r["text"] for r in recalled])
  memory.insert_many(list(think_fn(query, answer)))
  if forget is not None:
    memory.forget(forget)
  if merge:
    memory.merge(merge if callable(merge) else merge_texts)
  return answer, recalled
