"""Shared test setup: CPU only, deterministic; tiny model configs."""
import os
import sys

# CPU only, also where libtpu is installed (the tpu-aot extra): an unset or empty JAX_PLATFORMS
# would let jax look for a TPU backend. Set before jax is imported; subprocesses inherit it.
# tests/test_aot.py's TPU compiles describe a topology through libtpu without a TPU backend.
if not os.environ.get("JAX_PLATFORMS"):
  os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `configs` is importable as a package from the repo root
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import pytest  # noqa: E402

# Implicit rank promotion (adding a [T] to a [B, T] array) hides shape bugs; nanodo's tests
# raise on it, and so do ours. Subprocess workers inherit it through the environment.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
jax.config.update("jax_numpy_rank_promotion", os.environ["JAX_NUMPY_RANK_PROMOTION"])


@pytest.fixture
def tiny_model_dict():
  """A very small model config (as a plain dict) for fast unit tests."""
  return dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=128, scan_layers=True)
