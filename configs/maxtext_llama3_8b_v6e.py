# The setup of a published MaxText step time, for checking ctxjax.aot's roofline prediction
# against it (not a training recipe): AI-Hypercomputer/tpu-recipes,
# training/trillium/Llama3.1-8B-MaxText/v6e-16 (MaxText tpu-recipes-v0.1.4, workload
# llama3_1_8b_8192_no_collective_matmul): Llama-3.1-8B, TPU v6e-16 (16 chips), seq 8192, per-device
# batch 3 (global 48 = 393,216 tokens), fsdp 16, bf16; published log line: 3.393 s/step,
# 419.485 TFLOP/s/device (MFU 0.457 of v6e's 918), 7,243 tokens/s/device.
#
# CHECK:     python -m ctxjax.aot --config=configs/maxtext_llama3_8b_v6e.py
# EXPECTED:  2026-12-06, 2-core CPU host with libtpu, compile ~64 s: FITS 21.33 GiB per chip,
#            predicted 3.07 s/step (MFU 0.505) against MaxText's published 3.393 s
#            (benchmarks/README.md, "Predicted step time ... vs a published MaxText run").
# Attention: splash, as MaxText ran (`auto` on a TPU for packed data, docs/pods.md); the
# blockwise XLA kernel: --config.model.attention_impl=blockwise (predicted 3.45 s on 2026-12-05).
# Differences ctxjax cannot remove: remat "custom" with the layer input and q/k/v/out projections
# offloaded to host memory (ctxjax: remat "full", no host offload, so the forward is recomputed:
# more FLOPs), one step of 3 rows per chip (ctxjax: 3 accumulated micro-batches of 1 row, so
# FSDP gathers the weights 3 times), MaxText's XLA flags (collective/compute overlap, SparseCore
# offload);
# ctxjax keeps fp32 AdamW moments (MaxText: same default). Model dims are the Hugging Face
# meta-llama/Llama-3.1-8B config.json values.
import ml_collections

from configs import _llama2

SEQ_LEN = 8192
BATCH = 48                      # 3 per chip x 16 chips
# 3 micro-batches of one row per chip: one step of 3 rows per chip does not fit v6e's 32 GiB in
# ctxjax (f32 logits of 3 x 8192 x 128256 alone are 12.6 GB per chip; remat "full": 31.4 GiB of
# temporaries; "dots_with_no_batch_dims_saveable": 82.5 GiB). MaxText fits 3 rows by offloading
# activations to host memory.
ACCUM = 3


def get_config(remat: str = "full"):
  config = ml_collections.ConfigDict()
  config.model = _llama2.model("7b", max_position_embeddings=SEQ_LEN, rope_theta=5e5,
                               attention_impl="auto", remat_policy=remat)
  config.model.update(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
  config.data = ml_collections.ConfigDict(dict(
      name="demo", data_dir="", seq_len=SEQ_LEN, batch_size=BATCH,
      packed_positions="per_document", position_ids="data", max_position_id=SEQ_LEN))
  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=3e-4, warmup_steps=0, schedule="constant", min_lr_ratio=1.0,
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0))
  config.mesh = _llama2.mesh(ici_fsdp=-1)
  config.aot = ml_collections.ConfigDict(dict(topology="v6e-16"))
  config.train = ml_collections.ConfigDict(dict(
      steps=15, log_every=1, eval_batches=0, seed=0, save_every=0, keep_checkpoints=1,
      async_checkpoints=False, grad_accum_steps=ACCUM, init_from="", init_from_hf=""))
  return config
