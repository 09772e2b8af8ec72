"""A tiny ctxjax model that really retrieves a passkey at its training length, for the agent's
real-model command when no workdir is given: the recipe of tests/test_passkey_retrieval.py
(Mohtashami & Jaggi 2023 prompts of 40 tokens under a phrase-level stand-in tokenizer, a
2-layer width-64 model, 300 AdamW steps, fixed seeds; about a minute on a CPU).
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctxjax import xla_options
from ctxjax.data import synthetic
from ctxjax.model import Transformer, model_config_from_dict
from ctxjax.train import trainable as trainable_lib

TRAIN_LENGTH = 40  # prompt tokens without bos: the model's window for the agent command


class PhraseTokenizer:
  """The fixed phrases of the passkey templates are one token each (the header, each filler
  sentence, "The pass key is", ...), the digits, space and newline one token each; ids 0/1/2
  are pad/bos/eos; decode(encode(t)) == t. `extra_chars` adds character tokens after those
  (benchmarks/memory.py: printable ASCII, so demo-corpus text is encoded character by
  character beside the phrases); another character raises KeyError."""
  PHRASES = (synthetic.PASSKEY_HEADER, "The pass key is", ". Remember it. ",
             " is the pass key.", "What is the pass key? ",
             *[" " * k + u + "." for u in synthetic.GARBAGE[:-1].split(". ") for k in (0, 1)])
  PIECE = re.compile("|".join(re.escape(p) for p in sorted(PHRASES, key=len, reverse=True))
                     + r"|.|\n", re.S)

  def __init__(self, extra_chars: str = ""):
    self.pieces = ["<pad>", "<s>", "</s>", *sorted(set(self.PHRASES)), *"0123456789 \n"]
    self.pieces += sorted(set(extra_chars) - set(self.pieces))
    self.index = {p: i for i, p in enumerate(self.pieces)}
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self.vocab_size = len(self.pieces)

  def encode(self, text):
    return [self.index[p] for p in self.PIECE.findall(text)]

  def decode(self, ids):
    return "".join(self.pieces[i] for i in ids if i > self.eos_id)


# attention_impl: the dense kernel this model's documented results were trained and scored with
# (benchmarks/README.md, "Memory and retrieval attention"; docs/agent.md), kept so that a re-run
# reproduces them digit for digit: `auto` (blockwise) rounds its online softmax differently.
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
             scan_layers=False, dtype="float32", attention_impl="reference")


def tiny_model(vocab_size: int, **overrides):
  """(model, variables) of the 2-layer width-64 model; `overrides` change config keys (position
  scheme, attention mode, memory kind: benchmarks/memory.py)."""
  cfg = model_config_from_dict({**MODEL, "vocab_size": vocab_size, **overrides})
  model = Transformer(cfg)
  return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))


def training_rows(tok, n: int, seed: int = 1, length: int = TRAIN_LENGTH):
  """[n, T] rows `[bos] prompt answer eos pad...` (prompts of `length` tokens) at uniform
  depths, and their loss masks."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    s = synthetic.make_sample("passkey", tok, length=length, depth=float(rng.uniform()),
                              seed=[seed, i])
    rows.append([tok.bos_id, *s.prompt_ids.tolist(), *tok.encode(s.answer), tok.eos_id])
  tokens = np.full((n, max(map(len, rows))), tok.pad_id, np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return tokens, (tokens[:, 1:] != tok.pad_id).astype(np.float32)


def train(model, variables, tokens, mask, *, steps: int = 300, batch: int = 32):
  """AdamW with warmup-cosine, next-token loss on the masked targets -> (variables, loss)."""
  return train_rows(model, variables, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                       "mask": mask}, steps=steps, batch=batch)


def train_rows(model, variables, rows: dict, *, steps: int = 300, batch: int = 32,
               peak_lr: float = 3e-3, end_lr: float = 3e-4, trainable: Sequence[str] = (),
               training: bool = False):
  """`train` on prepared rows: inputs/targets/mask [N, T] and optionally positions and
  segment_ids [N, T] together (landmark rows, ctxjax/data/landmark.py). `trainable`: regexes
  of the parameters that train, as `optim.trainable` (ctxjax/train/trainable.py: the others
  get no gradient, no optimizer state and no update; LongMem's frozen backbone); () trains
  all. `training` is the model's train flag (landmark's grouped softmax, FoT's cross-batch
  negatives)."""
  tx = trainable_lib.only_trainable(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, peak_lr, min(30, steps // 10), steps, end_lr),
      weight_decay=0.01)), trainable)
  params = variables["params"]
  opt = tx.init(params)
  extra = ("positions", "segment_ids") if "positions" in rows else ()
  mask = trainable_lib.trainable_mask(params, trainable)

  @xla_options.jit
  def step(params, opt, x_BT, y_BT, m_BT, *extra_BT):
    def loss_fn(p):
      logits = model.apply({"params": p}, x_BT, *extra_BT, train=training)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, y_BT)
      return jnp.sum(nll * m_BT) / jnp.sum(m_BT)
    loss, grads = trainable_lib.value_and_grad(loss_fn, mask)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  loss = jnp.nan
  for idx in np.random.default_rng(2).integers(0, len(rows["inputs"]), (steps, batch)):
    params, opt, loss = step(params, opt, rows["inputs"][idx], rows["targets"][idx],
                             rows["mask"][idx], *[rows[k][idx] for k in extra])
  return {"params": params}, float(loss)


def trained_tiny_model(steps: int = 300, pool: int = 4096):
  """(model, variables, tokenizer, window, final loss) of the recipe above."""
  tok = PhraseTokenizer()
  model, variables = tiny_model(tok.vocab_size)
  variables, loss = train(model, variables, *training_rows(tok, pool), steps=steps)
  return model, variables, tok, TRAIN_LENGTH, loss
