"""A tiny ctxjax model that really retrieves a passkey at its training length, for the agent's
real-model command when no workdir is given: the recipe of tests/test_passkey_retrieval.py
(Mohtashami & Jaggi 2023 prompts of 40 tokens under a phrase-level stand-in tokenizer, a
2-layer width-64 model, 300 AdamW steps, fixed seeds; about a minute on a CPU).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctxjax.data import synthetic
from ctxjax.model import Transformer, model_config_from_dict

TRAIN_LENGTH = 40  # prompt tokens without bos: the model's window for the agent command


class PhraseTokenizer:
  """The fixed phrases of the passkey templates are one token each (the header, each filler
  sentence, "The pass key is", ...), any other character its own token; ids 0/1/2 are
  pad/bos/eos; decode(encode(t)) == t."""
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


def tiny_model(vocab_size: int):
  cfg = model_config_from_dict(dict(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
      scan_layers=False, dtype="float32"))
  model = Transformer(cfg)
  return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))


def training_rows(tok, n: int, seed: int = 1):
  """[n, T] rows `[bos] prompt answer eos pad...` at uniform depths, and their loss masks."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    s = synthetic.make_sample("passkey", tok, length=TRAIN_LENGTH, depth=float(rng.uniform()),
                              seed=[seed, i])
    rows.append([tok.bos_id, *s.prompt_ids.tolist(), *tok.encode(s.answer), tok.eos_id])
  tokens = np.full((n, max(map(len, rows))), tok.pad_id, np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return tokens, (tokens[:, 1:] != tok.pad_id).astype(np.float32)


def train(model, variables, tokens, mask, *, steps: int = 300, batch: int = 32):
  """AdamW with warmup-cosine, next-token loss on the masked targets -> (variables, loss)."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 3e-3, 30, steps, 3e-4), weight_decay=0.01))
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

  loss = jnp.nan
  for idx in np.random.default_rng(2).integers(0, len(tokens), (steps, batch)):
    params, opt, loss = step(params, opt, tokens[idx], mask[idx])
  return {"params": params}, float(loss)


def trained_tiny_model(steps: int = 300, pool: int = 4096):
  """(model, variables, tokenizer, window, final loss) of the recipe above."""
  tok = PhraseTokenizer()
  model, variables = tiny_model(tok.vocab_size)
  variables, loss = train(model, variables, *training_rows(tok, pool), steps=steps)
  return model, variables, tok, TRAIN_LENGTH, loss
