"""Training-time position ids, int32 [batch, length]; pure JAX and jit-able.

Sizes (batch, length, max_length, target_length) are Python ints (static under jit);
``rng`` is a JAX PRNG key.
  * contiguous: 0..L-1 per row (the default).
  * randomized: Ruoss et al. 2023 (google-deepmind/randomized_positional_encodings,
    ``models/positional_encodings.py``): a sorted subset of L distinct ids from [0, M).
  * PoSE: Zhu et al. 2024 (dwzhu-pku/PoSE ``src/train_pose.py::
    train_preprocess_function_pose``, v2 revision): two chunks, chunk 1 at offset 0,
    chunk 2 shifted by a random skip. Choosing the text that fills the chunks is the
    data pipeline's job; only the position ids are produced here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def contiguous_positions(batch: int, length: int) -> jax.Array:
  """int32 [B, L]: every row is 0..L-1."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def randomized_positions(rng, batch: int, length: int, max_length: int) -> jax.Array:
  """int32 [B, L]: per row, L distinct ids drawn uniformly from [0, max_length), sorted."""
  if max_length < length:
    raise ValueError(f"max_length ({max_length}) must be >= length ({length})")

  def row(key):
    ids_L = jax.random.choice(key, max_length, (length,), replace=False)
    return jnp.sort(ids_L).astype(jnp.int32)

  return jax.vmap(row)(jax.random.split(rng, batch))


def pose_positions_from(length: int, split, skip) -> jax.Array:
  """Deterministic PoSE core: arange(length) with ``skip`` added from index ``split`` on.

  split, skip: scalars -> int32 [L], or [B] arrays -> int32 [B, L].
  E.g. (8, 3, 10) -> [0, 1, 2, 13, 14, 15, 16, 17].
  """
  for name, v in (("split", split), ("skip", skip)):
    if isinstance(v, int) and v < 0:
      raise ValueError(f"{name} must be >= 0, got {v}")
  idx_L = jnp.arange(length, dtype=jnp.int32)
  split = jnp.asarray(split, dtype=jnp.int32)[..., None]
  skip = jnp.asarray(skip, dtype=jnp.int32)[..., None]
  idx_L = idx_L.reshape((1,) * (split.ndim - 1) + (length,))  # [L] or [1, L] like split
  return idx_L + jnp.where(idx_L >= split, skip, 0)


def pose_positions(rng, batch: int, length: int, target_length: int) -> jax.Array:
  """int32 [B, L] PoSE position ids for a training window L and target context Lt.

  Per row: split r1 ~ U{1..floor((L+1)/2)}, skip u ~ U{0..Lt-L} (both inclusive, as the
  reference's ``random.randint``); pos = arange(L), pos[r1:] += u. So pos[0] = 0, ids
  strictly increase, and max < Lt.
  """
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}")
  if target_length < length:
    raise ValueError(f"target_length ({target_length}) must be >= length ({length})")
  k_split, k_skip = jax.random.split(rng)
  split_B = jax.random.randint(k_split, (batch,), 1, (length + 1) // 2 + 1, dtype=jnp.int32)
  skip_B = jax.random.randint(k_skip, (batch,), 0, target_length - length + 1, dtype=jnp.int32)
  return pose_positions_from(length, split_B, skip_B)
