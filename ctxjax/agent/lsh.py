"""Random-projection locality-sensitive hashing (angular LSH; Andoni et al. 2015), the hash
Think-in-Memory indexes thoughts with (Liu et al. 2023; the form of Reformer, Kitaev et al.
2020): with a random Gaussian matrix R [D, b/2], a vector x falls in bucket
F(x) = argmax([xR ; -xR]) of b buckets, so vectors at a small angle share a bucket with high
probability.

A query's buckets ranked by the same scores give a multi-probe order (Lv et al. 2007): its
own bucket first, then the next most likely ones.
"""
from __future__ import annotations

import numpy as np


def planes(dim: int, buckets: int, seed: int = 0) -> np.ndarray:
  """R [dim, buckets // 2], Gaussian, deterministic in seed."""
  if buckets < 2 or buckets % 2:
    raise ValueError(f"buckets={buckets} must be an even number >= 2")
  return np.random.default_rng(seed).standard_normal((dim, buckets // 2)).astype(np.float32)


def bucket_scores(x_ND: np.ndarray, r_DH: np.ndarray) -> np.ndarray:
  """[xR ; -xR] -> [N, 2H]."""
  proj_NH = np.asarray(x_ND, np.float32) @ r_DH
  return np.concatenate([proj_NH, -proj_NH], axis=-1)


def hash_buckets(x_ND: np.ndarray, r_DH: np.ndarray) -> np.ndarray:
  """F(x) = argmax([xR ; -xR]) per row -> int [N]."""
  return np.argmax(bucket_scores(x_ND, r_DH), axis=-1)


def probe_order(x_D: np.ndarray, r_DH: np.ndarray) -> np.ndarray:
  """Every bucket, the query's own first, then by decreasing score."""
  return np.argsort(-bucket_scores(np.asarray(x_D)[None], r_DH)[0], kind="stable")
