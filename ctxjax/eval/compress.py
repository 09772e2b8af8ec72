"""Prompt compression in the spirit of LongLLMLingua (Jiang et al. 2023): a small ctxjax model
reads the context so that a long prompt fits a token budget.

  coarse  the context is split into chunks (fixed token chunks, or given boundaries such as
          documents / sentences); each chunk k is ranked by the question-conditioned
          perplexity r_k = -1/N_q sum_i log p(q_i | chunk_k, q_<i) (LongLLMLingua Eq. 2: the
          question is likelier after a relevant chunk); the best chunks are kept, in their
          original order, until the budget is reached (the last one may overshoot).
  fine    tokens with the lowest self-information -log p(x_i | x_<i) (Li 2023, Selective
          Context; LLMLingua's token-level step), computed by the small model over the kept
          chunks, are dropped until exactly `budget` tokens remain.

The small model enters as a `TokenScorer`: `fn(ids_T) -> log p(ids[t] | ids[<t]) for t >= 1`
(float [T-1]); `model_token_scorer` builds it from a Transformer.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

TokenScorer = Callable[[np.ndarray], np.ndarray]


def model_token_scorer(model, variables) -> TokenScorer:
  """A TokenScorer from a ctxjax Transformer; inputs are right-padded to a power of two so
  only a few lengths are compiled (causal: padding never changes earlier log-probs)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from ctxjax import xla_options  # noqa: PLC0415

  @xla_options.jit
  def logprobs(v, ids_1T):
    logp = jax.nn.log_softmax(model.apply(v, ids_1T).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp[:, :-1], ids_1T[:, 1:, None], axis=-1)[0, :, 0]

  def fn(ids_T: np.ndarray) -> np.ndarray:
    n = len(ids_T)
    padded = np.zeros(1 << max(1, (n - 1).bit_length()), np.int32)
    padded[:n] = ids_T
    return np.asarray(logprobs(variables, padded[None]))[:n - 1]
  return fn


def split_chunks(n: int, chunk_tokens: int, boundaries: Sequence[int] | None = None
                 ) -> list[tuple[int, int]]:
  """[start, end) spans covering [0, n): at `boundaries` (token offsets where a document /
  sentence starts) or every `chunk_tokens` tokens."""
  cuts = sorted({0, n, *(int(b) for b in boundaries if 0 < b < n)}) if boundaries \
      else list(range(0, n, chunk_tokens)) + [n]
  return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def question_perplexity(scorer: TokenScorer, chunk: np.ndarray, question: np.ndarray,
                        bos_id: int) -> float:
  """LongLLMLingua Eq. 2: -mean log p(question tokens | [bos] chunk)."""
  ids = np.concatenate([[bos_id], chunk, question]).astype(np.int32)
  return float(-np.mean(scorer(ids)[-len(question):]))


def compress(scorer: TokenScorer, context: np.ndarray, question: np.ndarray, budget: int, *,
             bos_id: int, chunk_tokens: int = 64,
             boundaries: Sequence[int] | None = None) -> tuple[np.ndarray, dict]:
  """(kept context ids in original order, stats) with exactly min(budget, len) tokens."""
  context = np.asarray(context, np.int32)
  question = np.asarray(question, np.int32)
  n = len(context)
  if budget >= n:
    return context, {"tokens_in": n, "tokens_out": n, "ratio": 1.0, "chunks": None,
                     "ranking": [], "kept_chunks": []}
  spans = split_chunks(n, chunk_tokens, boundaries)
  ppl = [question_perplexity(scorer, context[a:b], question, bos_id) for a, b in spans]
  ranking = [int(k) for k in np.argsort(ppl, kind="stable")]
  kept, total = [], 0
  for k in ranking:
    if total >= budget:
      break
    kept.append(k)
    total += spans[k][1] - spans[k][0]
  kept.sort()
  index = np.concatenate([np.arange(*spans[k]) for k in kept])
  coarse = context[index]
  if len(coarse) > budget:
    info = -scorer(np.concatenate([[bos_id], coarse]).astype(np.int32))  # -log p(x_i|x_<i)
    drop = np.argsort(info, kind="stable")[:len(coarse) - budget]
    keep = np.ones(len(coarse), bool)
    keep[drop] = False
    coarse = coarse[keep]
  return coarse, {"tokens_in": n, "tokens_out": int(len(coarse)),
                  "ratio": n / max(len(coarse), 1), "chunks": len(spans),
                  "ranking": ranking, "kept_chunks": kept,
                  "question_ppl": [float(np.exp(p)) for p in ppl]}
