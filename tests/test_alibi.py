import numpy as np
import pytest

from ctxjax.positions.alibi import alibi_bias, alibi_slopes

SLOPES_8 = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]


@pytest.mark.parametrize("num_heads,expected", [
    (8, SLOPES_8),
    (12, SLOPES_8 + [0.707107, 0.353553, 0.176777, 0.088388]),
    (6, [0.25, 0.0625, 0.015625, 0.003906, 0.5, 0.125]),
])
def test_slopes_vectors(num_heads, expected):
  s = alibi_slopes(num_heads)
  assert s.dtype == np.float32 and s.shape == (num_heads,)
  np.testing.assert_allclose(s, expected, rtol=0, atol=1e-6)


def test_bias_row_example():
  pos = np.arange(4, dtype=np.int32)[None]
  bias = np.asarray(alibi_bias(pos, pos, alibi_slopes(8)))
  assert bias.shape == (1, 8, 4, 4) and bias.dtype == np.float32
  np.testing.assert_array_equal(bias[0, 0, 3], [-1.5, -1.0, -0.5, 0.0])
  # Head 7 (slope 1/256), row 3.
  np.testing.assert_array_equal(bias[0, 7, 3], -np.array([3, 2, 1, 0]) / 256.0)


def test_shift_invariance():
  rng = np.random.default_rng(0)
  q = np.sort(rng.integers(0, 500, (2, 7)), axis=1).astype(np.int32)
  k = np.sort(rng.integers(0, 500, (2, 9)), axis=1).astype(np.int32)
  slopes = alibi_slopes(6)
  a = np.asarray(alibi_bias(q, k, slopes))
  b = np.asarray(alibi_bias(q + 12345, k + 12345, slopes))
  np.testing.assert_array_equal(a, b)
  # Independent numpy oracle.
  ref = -slopes[None, :, None, None] * (q[:, None, :, None] - k[:, None, None, :])
  np.testing.assert_allclose(a, ref, rtol=1e-6, atol=0)


def test_chunk_equals_slice_of_full():
  pos = (np.arange(16, dtype=np.int32) + 100)[None].repeat(2, 0)
  slopes = alibi_slopes(12)
  full = np.asarray(alibi_bias(pos, pos, slopes))
  for qs in range(0, 16, 4):
    for ks in range(0, 16, 8):
      chunk = np.asarray(alibi_bias(pos[:, qs:qs + 4], pos[:, ks:ks + 8], slopes))
      np.testing.assert_array_equal(chunk, full[:, :, qs:qs + 4, ks:ks + 8])
