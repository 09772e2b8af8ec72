"""Shared test setup: CPU only, deterministic; tiny model configs."""
import os
import sys

# CPU only, also where libtpu is installed (the tpu-aot extra): an unset or empty JAX_PLATFORMS
# would let jax look for a TPU backend. Set before jax is imported; subprocesses inherit it.
# tests/test_aot.py's TPU compiles describe a topology through libtpu without a TPU backend.
if not os.environ.get("JAX_PLATFORMS"):
  os.environ["JAX_PLATFORMS"] = "cpu"
# Backend optimisation level 0: XLA:CPU compiles 3-5x faster (compilation dominates this suite's
# runtime: a 2-layer model's gradient takes ~16 s to compile at the default level, ~3 s here);
# XLA's HLO passes and the float arithmetic they fix are the same at any LLVM level.
# CTXJAX_TEST_XLA_OPT=1 keeps XLA's default. Subprocesses inherit it.
if os.environ.get("CTXJAX_TEST_XLA_OPT") != "1" and "optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()
# One persistent compilation cache for the test session, shared by both xdist workers and every
# subprocess (they inherit the environment): many tests (and the training/study subprocesses)
# compile the same tiny programs under fresh jit closures, and XLA compilation is most of this
# suite's time. A hit is the same executable a fresh compile gives (the key covers the HLO, the
# compile options and XLA_FLAGS), so results are unchanged. A fresh directory per session
# (removed at its end): timings never depend on an earlier run. A set JAX_COMPILATION_CACHE_DIR
# is kept; CTXJAX_TEST_JAX_CACHE=0 turns the cache off (to time compiles).
_OWN_CACHE = not os.environ.get("JAX_COMPILATION_CACHE_DIR") and os.environ.get(
    "CTXJAX_TEST_JAX_CACHE") != "0"
if _OWN_CACHE:
  import tempfile  # noqa: E402
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ctxjax-test-jax-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
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


def pytest_unconfigure(config):
  """Removes the session's compilation cache where it was made (the xdist controller: its
  workers inherit the directory)."""
  del config
  if _OWN_CACHE:
    import shutil  # noqa: PLC0415
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
