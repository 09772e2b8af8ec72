import numpy as np
import pytest

from ctxjax.positions.absolute import sinusoidal_embedding


def test_sinusoidal_vector_d8_p1():
  pe = np.asarray(sinusoidal_embedding(np.array([[0, 1]], dtype=np.int32), 8))
  assert pe.shape == (1, 2, 8) and pe.dtype == np.float32
  np.testing.assert_allclose(
      pe[0, 1], [0.841471, 0.540302, 0.099833, 0.995004, 0.01, 0.99995, 0.001, 1.0],
      rtol=0, atol=1e-6)
  np.testing.assert_array_equal(pe[0, 0], [0, 1, 0, 1, 0, 1, 0, 1])


def test_sinusoidal_odd_dim_rejected():
  with pytest.raises(ValueError, match="dim"):
    sinusoidal_embedding(np.zeros((1, 1), np.int32), 7)
