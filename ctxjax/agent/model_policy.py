"""A ctxjax model as the agent's text functions: the policy (prompt -> output) and the
summariser of evicted messages, through `generate`.

  policy = text_generator(model, variables, tok, max_new_tokens=64)
  summarize = summarizer(text_generator(model, variables, tok, max_new_tokens=48))
  agent = Agent(policy, Session.open(..., summarize=summarize, count=token_count(tok)))

The prompt is tokenized with bos and, when longer than `max_prompt_tokens`, keeps its last
tokens (the working context's budget should keep it within the model's window anyway); the
output is the greedy continuation up to eos. `generate_fn` defaults to
ctxjax.eval.generate (injected, so a scripted stand-in tests this without a model).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

SUMMARY_PROMPT = ("Summarize the conversation so far in a few sentences, keeping names, "
                  "numbers and decisions.\nPrevious summary: {summary}\nMessages:\n{messages}\n"
                  "Summary:")


def token_count(tok) -> Callable[[str], int]:
  """The budget's token count: tokens of `tok` (without bos)."""
  return lambda text: len(tok.encode(text))


def text_generator(model, variables, tok, *, max_new_tokens: int = 64,
                   max_prompt_tokens: int | None = None,
                   generate_fn: Callable | None = None) -> Callable[[str], str]:
  """prompt -> the model's greedy continuation (decoded, cut at eos)."""
  if generate_fn is None:
    from ctxjax.eval import generate as generate_fn  # noqa: PLC0415
  eos = tok.eos_id if tok.eos_id >= 0 else None
  bos = [tok.bos_id] if tok.bos_id >= 0 else []

  def run(prompt: str) -> str:
    ids = tok.encode(prompt)
    if max_prompt_tokens is not None:
      ids = ids[-(max_prompt_tokens - len(bos)):]
    row = np.asarray([bos + ids], np.int32)
    out = np.asarray(generate_fn(model, variables, row, max_new_tokens, eos_id=eos))
    new = out[0, row.shape[1]:].tolist()
    if eos is not None and eos in new:
      new = new[:new.index(eos)]
    return tok.decode(new)

  return run


def summarizer(generate_text: Callable[[str], str]):
  """summarize(previous summary, evicted messages) -> the model's new summary (recursive:
  the previous summary is part of the prompt, as in MemGPT)."""
  from ctxjax.agent.context import render_messages  # noqa: PLC0415

  def summarize(summary: str, evicted: Sequence[dict]) -> str:
    return generate_text(SUMMARY_PROMPT.format(summary=summary or "(none)",
                                               messages=render_messages(evicted))).strip()

  return summarize
