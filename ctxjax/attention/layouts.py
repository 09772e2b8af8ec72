"""Context-parallel load balancing: token layouts as pure numpy index vectors.

Applied ONCE at data load to tokens, targets, positions and segment ids — every other op is
position-wise, and positions travel with their tokens, so attention stays exact — and undone on
outputs with `restore_from_context_parallel`. Device i of n holds reordered[i*T/n:(i+1)*T/n]:
  * "contiguous": device i gets tokens [i*T/n, (i+1)*T/n);
  * "zigzag" (dual-chunk swap, as in Llama 3, Dubey et al. 2024): 2n chunks,
    device i gets chunks i and 2n-1-i;
  * "striped" (Brandon et al. 2023, Striped Attention): device i gets tokens t = i (mod n).
T 16, n 4 causal (q, k) pairs per device: contiguous 10/26/42/58, zigzag 34 each, striped
28/32/36/40 (`causal_pair_counts`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ctxjax.registry import Registry


class Layout(NamedTuple):
  chunks_per_shard: int                            # the length must divide into n * this
  permutation: Callable[[int, int], np.ndarray]    # (length, num_shards) -> int [length]


LAYOUTS: Registry[Layout] = Registry("context-parallel layout strategy")


def _contiguous(length, num_shards):
  return np.arange(length)


def _zigzag(length, num_shards):
  chunks = np.arange(length).reshape(2 * num_shards, length // (2 * num_shards))
  order = np.stack([np.arange(num_shards), 2 * num_shards - 1 - np.arange(num_shards)], 1)
  return chunks[order.reshape(-1)].reshape(-1)


def _striped(length, num_shards):  # device i: tokens i, i+n, i+2n, ...
  return np.arange(length).reshape(length // num_shards, num_shards).T.reshape(-1)


LAYOUTS.add("contiguous", Layout(1, _contiguous))
LAYOUTS.add("zigzag", Layout(2, _zigzag))
LAYOUTS.add("striped", Layout(1, _striped))


def context_parallel_permutation(length: int, num_shards: int, strategy: str) -> np.ndarray:
  """int [length]: `reordered = x[perm]`; device i holds reordered[i*T/n:(i+1)*T/n]."""
  layout = LAYOUTS.get(strategy)
  if num_shards <= 0:
    raise ValueError(f"context-parallel num_shards={num_shards} must be > 0")
  chunks = layout.chunks_per_shard * num_shards
  if length % chunks:
    raise ValueError(f"context-parallel layout {strategy!r}: sequence length {length} is not "
                     f"divisible by {chunks} (= {layout.chunks_per_shard} x num_shards "
                     f"{num_shards})")
  return layout.permutation(length, num_shards)


def device_tokens(length: int, num_shards: int, strategy: str) -> np.ndarray:
  """int [num_shards, length / num_shards]: the original token indices each device holds."""
  return context_parallel_permutation(length, num_shards, strategy).reshape(num_shards, -1)


def _take(x, idx, axis):
  if isinstance(x, np.ndarray):
    return np.take(x, idx, axis=axis)
  x = jnp.asarray(x)
  axis = axis % x.ndim
  index = (slice(None),) * axis + (np.asarray(idx, np.int32),)
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = tuple(getattr(sharding, "spec", ()) or ())
  if any(e is not None for e in spec):  # explicitly sharded: keep the layout's sharding
    return x.at[index].get(out_sharding=sharding)
  return x[index]


def reorder_for_context_parallel(x, axis: int, num_shards: int, strategy: str):
  """Permute `x` along `axis` into the layout `strategy` (numpy in -> numpy out, else jax).

  Apply once at data load to every per-token array (tokens, targets, positions, segment ids,
  loss masks); then shard `axis` contiguously over the context axis.
  """
  perm = context_parallel_permutation(x.shape[axis], num_shards, strategy)
  return _take(x, perm, axis)


def restore_from_context_parallel(x, axis: int, num_shards: int, strategy: str):
  """Inverse of `reorder_for_context_parallel`: back to the natural token order."""
  perm = context_parallel_permutation(x.shape[axis], num_shards, strategy)
  return _take(x, np.argsort(perm), axis)


def causal_pair_matrix(length: int, num_shards: int, strategy: str) -> np.ndarray:
  """int [n, n]: causal (q, k) pairs (k <= q) between the queries of device i and the keys of
  device j for a single unpacked sequence of `length` tokens."""
  tok = device_tokens(length, num_shards, strategy)
  return (tok[None, :, None, :] <= tok[:, None, :, None]).sum((-1, -2))


def causal_pair_counts(length: int, num_shards: int, strategy: str) -> np.ndarray:
  """int [n]: causal (q, k) pairs whose query lives on each device (the attention work)."""
  return causal_pair_matrix(length, num_shards, strategy).sum(1)
