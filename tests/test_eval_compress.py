"""Prompt compression: exact budget, chunk order, question-conditioned ranking."""
import numpy as np

from ctxjax.eval import compress

BOS, ANSWER = 2, 999


def standin_scorer(ids):
  """log p(ids[t] | ids[<t]): high for every token once ANSWER has been read (a chunk with
  the answer makes the question likely: lowest question perplexity), token-dependent else."""
  ids = np.asarray(ids)
  seen = np.cumsum(ids == ANSWER)[:-1] > 0
  return np.where(seen, -0.1, -1.0 - (ids[1:] % 5) / 10.0)


def test_budget_exact_order_kept_answer_chunk_first():
  context = np.arange(100, 100 + 200, dtype=np.int32)
  context[130] = ANSWER  # in chunk 4 of 32-token chunks
  question = np.array([7, 8, 9], np.int32)
  for budget in (10, 37, 64, 100, 150):
    out, stats = compress.compress(standin_scorer, context, question, budget, bos_id=BOS,
                                   chunk_tokens=32)
    assert len(out) == budget == stats["tokens_out"]
    assert stats["ranking"][0] == 4
    assert stats["kept_chunks"] == sorted(stats["kept_chunks"]) and 4 in stats["kept_chunks"]
    where = [int(np.flatnonzero(context == t)[0]) for t in out]
    assert where == sorted(where)  # original order
    assert stats["ratio"] == 200 / budget


def test_short_context_unchanged_and_boundaries():
  ctx = np.arange(10, 20, dtype=np.int32)
  out, stats = compress.compress(standin_scorer, ctx, np.array([5]), 20, bos_id=BOS)
  assert np.array_equal(out, ctx) and stats["ratio"] == 1.0
  assert compress.split_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
  assert compress.split_chunks(10, 4, boundaries=[3, 7]) == [(0, 3), (3, 7), (7, 10)]
