"""`config.eval`: the tasks of `python -m ctxjax.evaluate` run inside the training loop.

  evaluate = make_evaluator(eval_cfg, data_cfg=..., model_cfg=..., train_length=...)
  scalars = evaluate(step, model, params)   # {"eval/ppl@256": 41.3, "eval/passkey@256": 1.0}

The trainer never imports eval (tests/test_structure.py): the command `python -m ctxjax.train`
hands `make_evaluator` to `ctxjax.train.trainer.train(..., make_evaluator=...)`, which builds
the evaluator once before the first step (so a bad length fails early) and calls it every
`eval.every` steps and after the last, with the parameters as it holds them. The tokenizer is
the run's (data.tokenizer, else the demo tokenizer: ctxjax/data/sources.py's load_tokenizer,
as the data sources load it), the texts the held-out documents of the run's corpus
(ctxjax/eval/run.py's held_out). Scalars:

  eval/ppl@L        perplexity over every held-out source at length L (non-overlapping
                    windows, at most `max_tokens` scored tokens per source; perplexity.py)
  eval/<task>@L     the task's mean score over depths and samples at length L (passkey,
                    needle, and for `ruler` niah_single / multikey / multivalue / multiquery;
                    ctxjax/eval/retrieval.py)

Lengths default to the training length and twice it (lengths past an absolute position
table are left out of the default; given explicitly they are an error).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from absl import logging

from ctxjax.data import sources
from ctxjax.eval import perplexity, retrieval
from ctxjax.eval.generation import generate
from ctxjax.eval.run import EvalInputError, Run, check_lengths, held_out
from ctxjax.model import cached_attention
from ctxjax.registry import Registry

# config.eval.tasks -> the retrieval tasks / "ppl" each runs (as `python -m ctxjax.evaluate`).
SUBTASKS: Registry[tuple[str, ...]] = Registry("eval.tasks")
SUBTASKS.add("ppl", ("ppl",))
SUBTASKS.add("passkey", ("passkey",))
SUBTASKS.add("needle", ("needle",))
SUBTASKS.add("ruler", ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"))
MAX_BATCH = 8  # prompts per generate call

Evaluator = Callable[[int, object, object], dict]


def _one_device(params):
  """The trainer's (possibly sharded) params, whole on one device: the evaluation programs
  are compiled without the training mesh."""
  device = jax.devices()[0]
  return jax.tree.map(lambda x: jax.device_put(x, device), params)


def _lengths(eval_cfg, model_cfg, train_length: int, extra: int) -> list[int]:
  if eval_cfg.lengths:
    lengths = [int(L) for L in eval_cfg.lengths]
    check_lengths(model_cfg, lengths, extra=extra)
    return lengths
  defaults = [train_length, 2 * train_length]
  fits = [L for L in defaults if _fits(model_cfg, L, extra)]
  return fits or [train_length]


def _fits(model_cfg, length: int, extra: int) -> bool:
  try:
    check_lengths(model_cfg, [length], extra=extra)
  except EvalInputError:
    return False
  return True


def make_evaluator(eval_cfg, *, data_cfg, model_cfg, train_length: int,
                   echo: Callable[[str], None] = logging.info) -> Evaluator:
  """The in-training evaluator of `eval_cfg` (ctxjax/train/config.py's EvalConfig) for a run
  of `model_cfg` (its longest stage) reading `data_cfg` (a DataConfig). Bad settings raise
  ValueError with one line naming config.eval."""
  tokenizer = sources.load_tokenizer(data_cfg, int(model_cfg.vocab_size))
  subtasks = [sub for task in eval_cfg.tasks for sub in SUBTASKS.get(task)]
  grid = [sub for sub in subtasks if sub != "ppl"]
  try:
    ppl_lengths = _lengths(eval_cfg, model_cfg, train_length, extra=0)
    grid_lengths = _lengths(eval_cfg, model_cfg, train_length,
                            extra=1 + max(retrieval.MAX_NEW_TOKENS.get(s) for s in grid)
                            ) if grid else []
  except EvalInputError as e:
    raise ValueError(f"config.eval: {str(e).replace('--lengths', 'eval.lengths')}") from None
  if grid:
    try:
      cached_attention.check_cacheable(model_cfg)
    except ValueError as e:
      raise ValueError(f"config.eval.tasks: {', '.join(grid)} generate text, but {e}") from None
  source = Run(name="train", model=None, variables=None, tokenizer=tokenizer,
               train_length=train_length, data_cfg=dataclasses.asdict(data_cfg))
  docs, haystack = held_out(source)
  for sub in grid:
    need = retrieval.min_length(tokenizer, sub, haystack)
    if min(grid_lengths) <= need:
      raise ValueError(f"config.eval.lengths: {min(grid_lengths)} is too short for {sub}: its "
                       f"prompt needs more than {need} tokens without filler")
  depths = [float(d) for d in eval_cfg.depths]
  batch = max(1, min(MAX_BATCH, len(depths) * eval_cfg.samples))

  def evaluate(step: int, model, params) -> dict:
    del step  # the prompts are the same at every step, so the scores are comparable
    variables = {"params": _one_device(params)}
    scalars = {}
    if "ppl" in subtasks:
      res = perplexity.perplexity_vs_length(
          perplexity.nll_fn_from_model(model, variables), docs, ppl_lengths,
          bos_id=tokenizer.bos_id, batch_tokens=min(eval_cfg.max_tokens, 16384),
          max_tokens=eval_cfg.max_tokens)
      scalars.update({f"eval/ppl@{L}": e["ppl"] for L, e in res["overall"].items()
                      if e["ppl"] is not None})
    for sub in grid:
      res = retrieval.retrieval_grid(
          generate, model, variables, tokenizer, sub, grid_lengths, depths,
          samples=eval_cfg.samples, haystack=haystack, batch_size=batch, seed=eval_cfg.seed,
          echo=echo)
      scores_DL = np.asarray(res["scores"], np.float64)
      scalars.update({f"eval/{sub}@{L}": float(scores_DL[:, i].mean())
                      for i, L in enumerate(res["lengths"])})
    return scalars

  return evaluate
