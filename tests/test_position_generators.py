import jax
import numpy as np
import pytest

from ctxjax.positions.generators import (contiguous_positions, pose_positions,
                                         pose_positions_from, randomized_positions)


def test_contiguous():
  p = np.asarray(contiguous_positions(3, 5))
  assert p.dtype == np.int32
  np.testing.assert_array_equal(p, np.tile(np.arange(5), (3, 1)))


def test_randomized_unique_sorted_in_range_varied():
  p = np.asarray(randomized_positions(jax.random.PRNGKey(0), 64, 40, 2048))
  assert p.shape == (64, 40) and p.dtype == np.int32
  assert (np.diff(p, axis=1) > 0).all()  # sorted and distinct
  assert p.min() >= 0 and p.max() < 2048
  assert len({tuple(r) for r in p}) == 64  # rows differ
  assert p.max() > 1900 and p.min() < 100  # spread over [0, M)
  q = np.asarray(randomized_positions(jax.random.PRNGKey(1), 64, 40, 2048))
  assert not np.array_equal(p, q)  # keys differ
  np.testing.assert_array_equal(  # deterministic per key
      p, np.asarray(randomized_positions(jax.random.PRNGKey(0), 64, 40, 2048)))


def test_randomized_full_range_and_error():
  p = np.asarray(randomized_positions(jax.random.PRNGKey(2), 2, 8, 8))
  np.testing.assert_array_equal(p, np.tile(np.arange(8), (2, 1)))
  with pytest.raises(ValueError, match="max_length"):
    randomized_positions(jax.random.PRNGKey(0), 2, 8, 7)


def test_pose_vector():
  np.testing.assert_array_equal(pose_positions_from(8, 3, 10), [0, 1, 2, 13, 14, 15, 16, 17])
  np.testing.assert_array_equal(
      pose_positions_from(4, np.array([1, 2]), np.array([0, 5])), [[0, 1, 2, 3], [0, 1, 7, 8]])


def test_pose_invariants_and_coverage():
  L, Lt, B = 8, 32, 4000
  fn = jax.jit(pose_positions, static_argnums=(1, 2, 3))
  p = np.asarray(fn(jax.random.PRNGKey(0), B, L, Lt))
  assert p.shape == (B, L) and p.dtype == np.int32
  assert (p[:, 0] == 0).all()
  assert (np.diff(p, axis=1) > 0).all()
  assert p.max() < Lt
  d = np.diff(p, axis=1)
  assert ((d > 1).sum(1) <= 1).all()  # at most one gap: two chunks
  skip = p[:, -1] - (L - 1)
  assert set(skip.tolist()) == set(range(Lt - L + 1))  # u covers {0..24}, incl. 0 and 24
  has_gap = skip > 0
  split = np.argmax(d > 1, axis=1)[has_gap] + 1
  assert set(split.tolist()) == {1, 2, 3, 4}  # r1 covers {1..floor((L+1)/2)}
  # Rows rebuild exactly from (split, skip).
  np.testing.assert_array_equal(p[has_gap], pose_positions_from(L, split, skip[has_gap]))
  # Same as eager; a different key gives different ids.
  np.testing.assert_array_equal(p, pose_positions(jax.random.PRNGKey(0), B, L, Lt))
  assert not np.array_equal(p, fn(jax.random.PRNGKey(1), B, L, Lt))


def test_pose_edge_cases_and_error():
  np.testing.assert_array_equal(pose_positions(jax.random.PRNGKey(0), 3, 8, 8),
                                np.tile(np.arange(8), (3, 1)))  # Lt == L: no skip
  np.testing.assert_array_equal(pose_positions(jax.random.PRNGKey(0), 2, 1, 5), [[0], [0]])
  with pytest.raises(ValueError, match="target_length"):
    pose_positions(jax.random.PRNGKey(0), 2, 8, 7)
