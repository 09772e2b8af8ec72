# Fu et al. 2024's 13B run: LLaMA-2 13B continually pretrained at 64K tokens, otherwise the
# recipe of configs/llama2_7b_80k.py (per-source upsampled mixture, constant LR 2e-5, ~4M tokens
# per batch, 5B tokens; Fu et al. 2024, experimental setup).
#
# COMMAND:   python -m ctxjax.train --config=configs/llama2_13b_64k.py --workdir=gs://BUCKET/13b64k
# CHECK:     python -m ctxjax.aot --config=configs/llama2_13b_64k.py --topology=v5p-128
# HARDWARE:  TPU v5p-128 (64 chips): fsdp 16 x context 4, ring attention over the context axis.
# EXPECTED:  AOT (measured 2026-11-22, benchmarks/README.md "AOT pod checks"): fits, 88.6 of
#            95 GiB HBM per chip (little headroom: train.grad_accum_steps=2 if a real run OOMs);
#            9.99e17 model FLOPs per step -> 85 s/step at MFU 0.4, 1193 steps in ~28 h.
import math

from configs import _llama2, llama2_7b_80k

SEQ_LEN = 65536                 # 64K
BATCH = 64                      # 64 x 64K = 4,194,304 tokens per step (4M = 4 * 2**20)
TOKENS = 5_000_000_000          # 5B tokens -> 1193 steps
HF_CHECKPOINT = "meta-llama/Llama-2-13b-hf"  # a local copy of the Hugging Face checkpoint


def get_config():
  config = llama2_7b_80k.get_config()
  config.model = _llama2.model("13b", max_position_embeddings=SEQ_LEN, rope_theta=5e5,
                               attention_impl="ring")
  config.data.seq_len = SEQ_LEN
  config.data.batch_size = BATCH
  config.data.max_position_id = SEQ_LEN
  config.data.tokenizer = HF_CHECKPOINT
  config.data.mixture.target_context = SEQ_LEN
  # 64 chips: fsdp 16 (4 rows and 1/16 of the weights per chip) x context 4 (16K tokens each).
  config.mesh = _llama2.mesh(ici_fsdp=16, ici_context=-1)
  config.train.steps = math.ceil(TOKENS / (BATCH * SEQ_LEN))
  config.train.init_from_hf = HF_CHECKPOINT
  return config
