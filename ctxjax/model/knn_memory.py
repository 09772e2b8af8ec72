"""kNN memory (Wu et al. 2022, Memorizing Transformers): a fixed-size store of past (key, value)
pairs per batch row and kv head, searched by q.k top-k, with FIFO eviction (Section 3: "the
oldest keys and values are dropped" once the memory is full).

The memory is an explicit pytree (`KNNMemory`): keys/values [B, M, K, D], a valid mask [B, M] and
the count of entries ever written (the write pointer is `written % M`). Nothing is hidden in a
module: inference carries it from window to window (ctxjax/model/memory_inference.py).

Attention over retrieved entries returns (out, lse) so a caller can combine it with local
attention either by one joint softmax (Focused Transformer, Tworkowski et al. 2023: memory keys
join the local softmax) or by a learned gate (Wu et al. 2022 Section 3, LongMem Wang et al.
2023 eq. 4): out = (1 - sigmoid(g)) * A_local + sigmoid(g) * A_mem (`merge_joint`,
`merge_gated`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ctxjax.attention.reference import MASKED

_VISIBLE = 0.5 * MASKED  # a retrieved score above this came from a visible entry


class KNNMemory(NamedTuple):
  keys_BMKD: jax.Array
  values_BMKD: jax.Array
  valid_BM: jax.Array      # bool: the slot holds an entry
  written: jax.Array       # int32 scalar: entries ever written (FIFO pointer = written % M)


def init(batch: int, size: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
         ) -> KNNMemory:
  zeros = jnp.zeros((batch, size, num_kv_heads, head_dim), dtype)
  return KNNMemory(zeros, zeros, jnp.zeros((batch, size), bool), jnp.zeros((), jnp.int32))


def write(mem: KNNMemory, k_BTKD, v_BTKD) -> KNNMemory:
  """Append T entries per row; when full, the oldest are overwritten (FIFO). Writing more than
  M entries at once keeps the last M."""
  size, length = mem.keys_BMKD.shape[1], k_BTKD.shape[1]
  keep = min(length, size)
  slots = (mem.written + (length - keep) + jnp.arange(keep)) % size  # distinct: keep <= size
  dtype = mem.keys_BMKD.dtype
  return KNNMemory(mem.keys_BMKD.at[:, slots].set(k_BTKD[:, length - keep:].astype(dtype)),
                   mem.values_BMKD.at[:, slots].set(v_BTKD[:, length - keep:].astype(dtype)),
                   mem.valid_BM.at[:, slots].set(True), mem.written + length)


def ordered(mem: KNNMemory) -> KNNMemory:
  """The memory with its slots rolled oldest first (for inspection and tests)."""
  size = mem.keys_BMKD.shape[1]
  start = jnp.where(mem.written > size, mem.written % size, 0)
  roll = lambda x: jnp.roll(x, -start, axis=1)
  return KNNMemory(roll(mem.keys_BMKD), roll(mem.values_BMKD), roll(mem.valid_BM), mem.written)


def top_neighbours(logits, k: int, *, approx: bool = False, recall_target: float = 0.95):
  """(scores, indices) of the k largest logits along the last axis: exact `lax.top_k`, or
  `lax.approx_max_k` (a partial reduction built for TPUs; its recall_target is what a TPU
  guarantees)."""
  if approx:
    return jax.lax.approx_max_k(logits, k, recall_target=recall_target)
  return jax.lax.top_k(logits, k)


def attend(q_BTKGD, keys_BSKD, values_BSKD, mask, *, scale: float, neighbours: int = 0,
           approx: bool = False, recall_target: float = 0.95):
  """Softmax attention of grouped queries over S entries, optionally restricted to each query's
  top-`neighbours` entries by q.k (0 = all, without a search). `mask` broadcasts to
  [B, T, K, G, S] (False = not visible).
  -> (out [B, T, K, G, D] float32, lse [B, T, K, G], any visible entry [B, T, K, G] bool)."""
  logits = jnp.einsum("btkgd,bskd->btkgs", q_BTKGD, keys_BSKD,
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask, logits, MASKED)
  neighbours = min(neighbours, logits.shape[-1])  # a short training row has fewer entries
  if neighbours:
    logits, idx = top_neighbours(logits, neighbours, approx=approx, recall_target=recall_target)
    values_BKSD = jnp.swapaxes(values_BSKD, 1, 2)[:, None, :, None]  # [B, 1, K, 1, S, D]
    chosen = jnp.take_along_axis(values_BKSD, idx[..., None], axis=4)  # [B, T, K, G, n, D]
    visible = logits > _VISIBLE
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("btkgn,btkgnd->btkgd", probs, chosen.astype(jnp.float32))
  else:
    visible = jnp.broadcast_to(mask, logits.shape)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("btkgs,bskd->btkgd", probs, values_BSKD.astype(jnp.float32))
  any_visible = visible.any(axis=-1)
  return (jnp.where(any_visible[..., None], out, 0.0), jax.nn.logsumexp(logits, axis=-1),
          any_visible)


def merge_joint(parts):
  """One softmax over the union of the parts' entries, from each part's (out, lse, any)."""
  lse = jnp.stack([jnp.where(a, l, MASKED) for _, l, a in parts])
  weights = jax.nn.softmax(lse, axis=0)
  out = sum(w[..., None] * o for w, (o, _, _) in zip(weights, parts))
  return jnp.where(jnp.any(jnp.stack([a for _, _, a in parts]), axis=0)[..., None], out, 0.0)


def merge_gated(local, memory, gate_logit_KG):
  """(1 - sigmoid(g)) * A_local + sigmoid(g) * A_mem per head; a query with no visible memory
  entry keeps A_local (its memory output would be an empty average)."""
  g = jax.nn.sigmoid(gate_logit_KG.astype(jnp.float32))[None, None, :, :, None]
  mixed = (1.0 - g) * local[0] + g * memory[0]
  return jnp.where(memory[2][..., None], mixed, local[0])
