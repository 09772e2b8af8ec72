"""End to end: a small model trained on passkey prompts (Mohtashami & Jaggi 2023) retrieves the
key at its training length, and the evaluation harness (retrieval_grid with the kv-cache
`generate`) reports it; the same harness reports ~0 for the untrained model.

CPU-cheap and deterministic: a phrase-level tokenizer of the passkey templates keeps a prompt at
40 tokens, the model is 2 layers of width 64, and training is 300 AdamW steps with
fixed seeds (numpy for the data, jax for the weights).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctxjax.data import synthetic
from ctxjax.eval import generate, retrieval
from ctxjax.model import Transformer, model_config_from_dict

TRAIN_LENGTH = 40          # prompt tokens (without bos); the shortest passkey prompt is 20
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
STEPS, BATCH, POOL = 300, 32, 4096


class PhraseTokenizer:
  """A stand-in tokenizer: the fixed phrases of the passkey templates are one token each
  (the header, each filler sentence, "The pass key is", ...), any other character is its own
  token (digits, blanks); ids 0/1/2 are pad/bos/eos. A prompt of 40 tokens holds a header,
  ~20 filler sentences, the needle and the question; decode(encode(t)) == t."""
  PHRASES = (synthetic.PASSKEY_HEADER, "The pass key is", ". Remember it. ",
             " is the pass key.", "What is the pass key? ",
             *[" " * k + u + "." for u in synthetic.GARBAGE[:-1].split(". ") for k in (0, 1)])
  PIECE = re.compile("|".join(re.escape(p) for p in sorted(PHRASES, key=len, reverse=True))
                     + r"|.|\n", re.S)

  def __init__(self):
    self.pieces = ["<pad>", "<s>", "</s>", *sorted(set(self.PHRASES)), *"0123456789 \n"]
    self.index = {p: i for i, p in enumerate(self.pieces)}
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self.vocab_size = len(self.pieces)

  def encode(self, text):
    return [self.index[p] for p in self.PIECE.findall(text)]

  def decode(self, ids):
    return "".join(self.pieces[i] for i in ids if i > self.eos_id)


def _model(vocab_size):
  cfg = model_config_from_dict(dict(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
      scan_layers=False, dtype="float32"))
  model = Transformer(cfg)
  return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))


def _pool(tok, n, seed=1):
  """[n, T] rows `[bos] prompt answer eos pad...` of training-length prompts at uniform depths
  (seeds disjoint from the harness' [0, length, depth, sample]) and their loss masks."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    s = synthetic.make_sample("passkey", tok, length=TRAIN_LENGTH, depth=float(rng.uniform()),
                              seed=[seed, i])
    rows.append([tok.bos_id, *s.prompt_ids.tolist(), *tok.encode(s.answer), tok.eos_id])
  width = max(map(len, rows))
  tokens = np.full((n, width), tok.pad_id, np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return tokens, (tokens[:, 1:] != tok.pad_id).astype(np.float32)


def _train(model, variables, tokens, mask):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 3e-3, 30, STEPS, 3e-4), weight_decay=0.01))
  params = variables["params"]
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x_BT, m_BT):
    def loss_fn(p):
      logits = model.apply({"params": p}, x_BT[:, :-1])
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, x_BT[:, 1:])
      return jnp.sum(nll * m_BT) / jnp.sum(m_BT)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  order = np.random.default_rng(2).integers(0, len(tokens), (STEPS, BATCH))
  for idx in order:
    params, opt, loss = step(params, opt, tokens[idx], mask[idx])
  return {"params": params}, float(loss)


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
