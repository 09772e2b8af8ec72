# Fu et al. 2024 ("Data Engineering for Scaling Language Models to 128K Context"): LLaMA-2 7B
# continually pretrained at 80K tokens on a per-source length-upsampled SlimPajama mixture,
# constant LR 2e-5, ~4M tokens per batch, 5B tokens (Fu et al. 2024, experimental setup).
#
# COMMAND:   python -m ctxjax.train --config=configs/llama2_7b_80k.py --workdir=gs://BUCKET/7b80k
#            (on every worker: launch/tpu_vm.py --tpu=NAME --accelerator-type=v5p-128 ...)
# CHECK:     python -m ctxjax.aot --config=configs/llama2_7b_80k.py --topology=v5p-128
# HARDWARE:  TPU v5p-128 (64 chips): fsdp 16 x context 4, ring attention over the context axis.
# EXPECTED:  AOT (measured 2026-11-22, benchmarks/README.md "AOT pod checks"): fits, 58.1 of
#            95 GiB HBM per chip; 6.63e17 model FLOPs per step. Roofline from the compiled program
#            (2026-12-05, benchmarks/README.md): 168 s/step, MFU 0.134, HBM-bound (the ring's
#            blockwise score blocks round-trip HBM), 1272 steps in ~59 h. Paper (unverified): needle-in-a-haystack 88.0 at up to 128K after 5B tokens.
import math

import ml_collections

from configs import _llama2

SEQ_LEN = 81920                 # 80K
# Paper: "4M tokens per batch". 48 x 80K = 3.93M: 48 = 16 x 3 lets the batch split over 16 fsdp
# groups (50 = 2 x 5 x 5 would allow only fsdp 2, leaving each chip half the weights).
BATCH = 48
TOKENS = 5_000_000_000          # 5B tokens -> 1272 steps
# A local copy of the Hugging Face checkpoint (config.json, safetensors, tokenizer files).
HF_CHECKPOINT = "meta-llama/Llama-2-7b-hf"


def get_config():
  config = ml_collections.ConfigDict()
  # rope_theta 5e5: ABF as Xiong et al. 2023, which Fu et al. follow; the paper states no base
  # in its text; the released yaofu/llama-2-7b-80k config is the authority.
  config.model = _llama2.model("7b", max_position_embeddings=SEQ_LEN, rope_theta=5e5,
                               attention_impl="ring")
  config.data = ml_collections.ConfigDict(dict(
      name="mixture",
      data_dir="",                  # "" -> $CTXJAX_DATA_DIR or ~/.cache/ctxjax
      jsonl="",                     # SET: SlimPajama-shaped JSONL (text + source); "" = demo corpus
      tfds_name="", tfds_data_dir="",  # or a prepared tfds dataset instead of jsonl
      tokenizer=HF_CHECKPOINT,      # LLaMA-2's tokenizer, from the HF checkpoint directory
      seq_len=SEQ_LEN,
      batch_size=BATCH,             # global, per optimizer step
      packed_positions="per_document",
      position_ids="data",
      max_position_id=SEQ_LEN,
      # Per-source length upsampling (Fu et al. §3): the source mix stays SlimPajama's, documents
      # longer than 4K are upsampled within each source to ~70% of the tokens.
      mixture=dict(kind="per_source_upsample", short_threshold=4096, target_context=SEQ_LEN,
                   long_share=0.7),
      shuffle_seed=None,
  ))
  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-5, warmup_steps=0, schedule="constant", min_lr_ratio=1.0,
      weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0,
  ))
  # v5p-128 = 64 chips: fsdp 16 (3 rows and 1/16 of the weights and AdamW state per chip) x
  # context 4 (20480 tokens per chip per row, ring attention).
  config.mesh = _llama2.mesh(ici_fsdp=16, ici_context=-1)
  config.aot = ml_collections.ConfigDict(dict(topology="v5p-128"))  # python -m ctxjax.aot
  config.train = ml_collections.ConfigDict(dict(
      steps=math.ceil(TOKENS / (BATCH * SEQ_LEN)), log_every=10, eval_batches=8, seed=0,
      save_every=100, keep_checkpoints=3, async_checkpoints=True,
      grad_accum_steps=1,
      init_from_hf=HF_CHECKPOINT,   # continual pretraining starts from LLaMA-2 7B
  ))
  return config
