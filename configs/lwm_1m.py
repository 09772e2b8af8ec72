# LWM-style progressive context extension (Liu et al. 2024, "World Model on Million-Length Video
# and Language with Blockwise RingAttention"): LLaMA-2 7B trained in stages 32K -> 128K -> 256K ->
# 512K -> 1M tokens, raising rope_theta at each stage, ring attention over the context axis.
#
# COMMAND:   python -m ctxjax.train --config=configs/lwm_1m.py --workdir=gs://BUCKET/lwm1m
#            (one run walks all stages, recompiling once per stage; resumes mid-stage)
# CHECK:     python -m ctxjax.aot --config=configs/lwm_1m.py --topology=v5p-256 [--stage=i]
# HARDWARE:  TPU v5p-256 (128 chips): fsdp 4 x context 32; every stage holds 32K tokens per chip.
# EXPECTED:  AOT (measured 2026-11-22, benchmarks/README.md "AOT pod checks"): every stage fits,
#            86.8-89.0 GiB of 95 per chip (1M stage: 54.9); est. at MFU 0.4: 16 s/step at 32K ...
#            301 s/step at 1M, ~39 h for the five 1B-token stages.
#
# rope_theta per stage: the LWM README's 128K/256K 1e7, 512K 2.5e7, 1M 5e7 (the released
# LWM-Text-1M config: 5e7, max_position_embeddings 1048576); 32K 1e6 is the paper's (unverified,
# Liu et al. 2024, "World Model on Million-Length Video and Language with Blockwise
# RingAttention"). The paper's per-stage token counts are unverified: STAGE_TOKENS is
# ctxjax's placeholder, 1B tokens per stage; set it from your budget.
from configs import _llama2, llama2_7b_80k

K = 1024
TOKENS_PER_STEP = 4 * K * K     # constant across stages: 128 x 32K ... 4 x 1M
STAGE_TOKENS = 1_000_000_000
THETAS = {32 * K: 1e6, 128 * K: 1e7, 256 * K: 1e7, 512 * K: 2.5e7, 1024 * K: 5e7}


def get_config():
  config = llama2_7b_80k.get_config()
  first = min(THETAS)
  config.model = _llama2.model("7b", max_position_embeddings=first, rope_theta=THETAS[first],
                               attention_impl="ring")
  config.data.seq_len = first
  config.data.batch_size = TOKENS_PER_STEP // first  # stages keep batch x seq_len constant
  config.data.max_position_id = max(THETAS)
  config.data.mixture = None     # plain packing: point data.jsonl at long documents (LWM: books)
  config.stages = [dict(seq_len=t, tokens=STAGE_TOKENS, rope_theta=theta,
                        max_position_embeddings=t) for t, theta in sorted(THETAS.items())]
  # 128 chips: the 1M stage has 4 rows, so data*fsdp <= 4; the sequence splits 32 ways.
  config.mesh = _llama2.mesh(ici_fsdp=4, ici_context=-1)
  config.aot.topology = "v5p-256"
  config.optim.warmup_steps = 0
  return config
