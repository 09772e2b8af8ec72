"""End to end: a small model trained on passkey prompts (Mohtashami & Jaggi 2023) retrieves the
key at its training length, and the evaluation harness (retrieval_grid with the kv-cache
`generate`) reports it; the same harness reports ~0 for the untrained model.

CPU-cheap and deterministic: a phrase-level tokenizer of the passkey templates keeps a prompt at
40 tokens, the model is 2 layers of width 64, and training is 300 AdamW steps with
fixed seeds (numpy for the data, jax for the weights).
"""
import pytest

# The recipe (tokenizer, model, data, training) is shared with `python -m ctxjax.agent.passkey`.
from ctxjax.agent.passkey_model import TRAIN_LENGTH, PhraseTokenizer
from ctxjax.agent.passkey_model import tiny_model as _model
from ctxjax.agent.passkey_model import train as _train
from ctxjax.agent.passkey_model import training_rows as _pool
from ctxjax.eval import generate, retrieval

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
POOL = 4096


def _grid(model, variables, tok):
  return retrieval.retrieval_grid(generate, model, variables, tok, "passkey", [TRAIN_LENGTH],
                                  DEPTHS, samples=4, batch_size=20, echo=lambda _: None)


@pytest.fixture(scope="module")
def tok_and_model():
  tok = PhraseTokenizer()
  return tok, *_model(tok.vocab_size)


def test_untrained_model_scores_zero(tok_and_model):
  tok, model, variables = tok_and_model
  res = _grid(model, variables, tok)
  assert res["mean_score"] <= 0.05, res["scores"]


def test_trained_model_retrieves_at_its_training_length(tok_and_model):
  tok, model, variables = tok_and_model
  assert retrieval.min_length(tok, "passkey") < TRAIN_LENGTH
  tokens, mask = _pool(tok, POOL)
  trained, loss = _train(model, variables, tokens, mask)
  res = _grid(model, trained, tok)
  assert res["mean_score"] >= 0.8, (loss, res["scores"], res["samples"][:4])
  assert min(min(row) for row in res["scores"]) >= 0.5, res["scores"]
