"""benchmarks/gpu.py's pieces at small shapes on CPU: the script a GPU session runs in one call
must work before the GPU time is spent (its cuDNN rows are skipped off a GPU, with the reason)."""
import importlib.util
import os

import jax.numpy as jnp

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "gpu.py")
_SPEC = importlib.util.spec_from_file_location("benchmarks_gpu", _PATH)
gpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu)


def test_attention_rows_time_blockwise_check_it_and_skip_cudnn_off_a_gpu():
  rows = list(gpu.attention_rows([128], heads=4, kv_heads=2, head_dim=16, check_max_len=128,
                                 dtype=jnp.bfloat16))
  blockwise, cudnn = rows
  assert blockwise["impl"] == "blockwise" and blockwise["matches_reference"] is True
  assert blockwise["fwd_bwd_ms"] > 0
  assert set(blockwise["max_abs_error"]) == {"out", "dq", "dk", "dv"}
  assert cudnn["impl"] == "cudnn" and "GPU backend" in cudnn["skipped"]


def test_model_rows_train_and_count_flops():
  (row,) = gpu.model_rows(gpu.QUICK_MODEL, 64, ["auto"], steps=3)
  assert "error" not in row, row.get("error")
  assert row["tokens_per_sec"] > 0 and row["flops_per_token"] > 6 * row["params"] * 0.5
  assert row["compute_dtype"] == "float32" and jnp.isfinite(row["loss_after"])


def test_bf16_peaks_by_device_name():
  assert gpu.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert gpu.bf16_peak("NVIDIA H100 PCIe") == 756e12
  assert gpu.bf16_peak("NVIDIA H200") == 989e12
  assert gpu.bf16_peak("cpu") is None
