"""The attention of a memory layer: local attention within the window plus attention over a
(key, value) memory (ctxjax/model/knn_memory.py).

Memory models (`model.memory_kind`: memorizing, fot, longmem) read a long input as windows of
W = `model.memory_window` tokens; every layer attends causally inside its window at window-local
positions 0..W-1 (`window_layout`), and memory layers also see earlier windows' keys/values:

  * parallel (no "memory" collection: training and plain evaluation): all windows at once; the
    memory of a query in window c is what the FIFO memory would hold after windows 0..c-1 of
    the same row were written: the last `memory_size` keys before its window, of its own
    document. In training, Focused Transformer (Tworkowski et al. 2023, Section 3,
    "cross-batch") adds the same entries of `memory_cross_batch` other rows of the batch as
    negatives and back-propagates through them;
    the other kinds stop the gradient at the stored keys (Wu et al. 2022, Section 3: the memory
    is not differentiable).
  * inference (a "memory" collection with a `state`, memory_inference.py): one window per call;
    the window's queries search the carried KNNMemory, then its keys/values are written.
Memory keys are RoPE-encoded as if at position 0, the start of the local context (FoT,
LongLLaMA's memory keys); queries keep their local position. fot merges local and memory
entries in one softmax; memorizing and longmem mix the two outputs with a per-head gate
initialised at 0 (sigmoid 0.5), as LongMem (Wang et al. 2023) does.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctxjax.model import knn_memory


def window_layout(segment_ids_BT, window: int):
  """(window-local positions, segment ids that also separate windows) for a [B, T] batch: the
  local attention of every layer of a memory model stays inside its window."""
  batch, length = segment_ids_BT.shape
  windows = -(-length // window)
  t = np.arange(length)
  positions = jnp.broadcast_to(jnp.asarray(t % window, jnp.int32), (batch, length))
  return positions, segment_ids_BT * windows + jnp.asarray(t // window,
                                                            segment_ids_BT.dtype)[None, :]


def cross_batch_rows(batch: int, negatives: int) -> np.ndarray:
  """[B, 1 + negatives] row indices whose keys a row's memory holds in training: itself (the
  positives), then the next `negatives` rows cyclically (FoT's cross-batch negatives)."""
  if negatives >= batch:
    raise ValueError(f"model.memory_cross_batch={negatives} needs a batch of more than "
                     f"{negatives} rows, got batch size {batch}")
  return (np.arange(batch)[:, None] + np.arange(1 + negatives)[None, :]) % batch


def training_memory_mask(segment_ids_BT, window: int, size: int, negatives: int):
  """[B, T, R, S] bool, R = 1 + negatives source rows (cross_batch_rows), S = T keys: may the
  query at t of row b see key s of row rows[b, r]? Key s must lie in an earlier window than t
  and among the last `size` keys before t's window (the FIFO memory's content); positives
  (r = 0) must also be of t's document, negatives are other documents by construction."""
  length = segment_ids_BT.shape[1]
  t = np.arange(length)
  start = (t // window) * window  # first position of t's window
  visible = (t[None, :] < start[:, None]) & (t[None, :] >= start[:, None] - size)  # [T, S]
  same_doc = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]  # [B, T, S]
  negative = jnp.asarray(np.arange(1 + negatives) > 0)  # [R]: r > 0 needs no same document
  return (jnp.asarray(visible)[None, :, None, :] &
          (negative[None, None, :, None] | same_doc[:, :, None, :]))


def _grouped(cfg, q_BTHD):
  b, t, _, d = q_BTHD.shape
  return q_BTHD.reshape(b, t, cfg.num_key_value_heads, cfg.num_query_groups, d)


def memory_attention(module: nn.Module, cfg, scheme, q_BTHD, k_BTKD, v_BTKD, positions_BT,
                     segment_ids_BT, training: bool, source_kv=None):
  """Attention output [B, T, H, D] of a memory layer. `source_kv` = the (k, v) the memory
  stores ([B, T, K, D], unrotated); None = this layer's own (LongMem passes the backbone's)."""
  src_k, src_v = (k_BTKD, v_BTKD) if source_kv is None else source_kv
  if scheme.rotate_qk is not None:
    zeros = jnp.zeros_like(positions_BT)
    q_BTHD, k_BTKD = scheme.rotate_qk(cfg, q_BTHD, k_BTKD, positions_BT, positions_BT)
    _, src_k = scheme.rotate_qk(cfg, q_BTHD, src_k, positions_BT, zeros)  # as at position 0
  q = _grouped(cfg, q_BTHD)
  scale = cfg.head_dim ** -0.5
  opts = dict(scale=scale, neighbours=cfg.memory_neighbors,
              approx=cfg.memory_search == "approx", recall_target=cfg.memory_recall_target)
  pos = positions_BT
  local_mask = ((pos[:, :, None] >= pos[:, None, :]) &
                (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]))
  local = knn_memory.attend(q, k_BTKD, v_BTKD, local_mask[:, :, None, None, :], scale=scale)

  if module.has_variable("memory", "state"):  # inference: one window against the carried state
    state = module.variable("memory", "state")
    mem = state.value
    memory = knn_memory.attend(q, mem.keys_BMKD, mem.values_BMKD,
                               mem.valid_BM[:, None, None, None, :], **opts)
    state.value = knn_memory.write(mem, src_k, src_v)
  else:
    negatives = cfg.memory_cross_batch if training else 0
    memory = _training_memory(cfg, q, src_k, src_v, segment_ids_BT, negatives, opts)

  if cfg.memory_kind == "fot":
    out = knn_memory.merge_joint([local, memory])
  else:
    gate = module.param("memory_gate", nn.with_logical_partitioning(
        nn.initializers.zeros, ("kv_heads", None)),
        (cfg.num_key_value_heads, cfg.num_query_groups), jnp.float32)
    out = knn_memory.merge_gated(local, memory, gate)
  return out.reshape(q_BTHD.shape).astype(q_BTHD.dtype)


def _training_memory(cfg, q_BTKGD, src_k_BTKD, src_v_BTKD, segment_ids_BT, negatives: int,
                     opts):
  """All windows at once: each query's memory as the FIFO memory would hold it, plus
  `negatives` other rows' (module doc)."""
  batch, length = segment_ids_BT.shape
  if cfg.memory_kind != "fot":  # the memory holds values, not a differentiable path
    src_k_BTKD, src_v_BTKD = jax.lax.stop_gradient((src_k_BTKD, src_v_BTKD))
  windows = -(-length // cfg.memory_window)
  documents = segment_ids_BT // windows  # undo window_layout's window separation
  mask_BTRS = training_memory_mask(documents, cfg.memory_window, cfg.memory_size, negatives)
  rows = cross_batch_rows(batch, negatives)
  flat = lambda x: x[rows].reshape(batch, -1, *x.shape[2:])  # [B, R*S, K, D]
  mask = mask_BTRS.reshape(batch, length, 1, 1, -1)
  return knn_memory.attend(q_BTKGD, flat(src_k_BTKD), flat(src_v_BTKD), mask, **opts)
