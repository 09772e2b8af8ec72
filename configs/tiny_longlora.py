# LongLoRA (Chen et al. 2024) on the tiny model: extend configs/tiny.py (trained at T=256) to
# T=1024 with linear position interpolation (factor 4 = ceil(1024/256), as LongLoRA's
# fine-tune.py), S2-Attn in training (groups of T/4; full attention at eval), LoRA r=8 alpha=16
# on q,k,v,o, and only the adapters + embeddings + norms trained ("embed,norm").
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny.py --workdir=runs/tiny \
#                --config.train.steps=150
#            python -m ctxjax.train --config=configs/tiny_longlora.py --workdir=runs/longlora \
#                --config.train.init_from=runs/tiny
#            python -m ctxjax.export_hf --workdir=runs/longlora --out=runs/longlora_hf \
#                --tokenizer_model=~/.cache/ctxjax/demo-v1/spm_bpe_v1024.model
#            (argument: longlora (default) | lora | full | int8 | nf4; see VARIANTS)
# HARDWARE:  2 CPU cores shared with other jobs (load ~6): 7.0 min for the 150-step tiny run,
#            3.8 min for the 60 LongLoRA steps (~790 tokens/s), 6 s for the export.
# EXPECTED:  measured 2026-11-22: the tiny run ends at eval_loss 5.434 (T=256); the same
#            parameters evaluate at 5.193 at T=1024 with PI x4 (benchmarks/lora.py); after 60
#            LongLoRA steps (329,984 of 3.8M parameters trained) eval_loss 5.159 at T=1024,
#            final train loss 4.43. The export (adapters merged) loads with
#            AutoModelForCausalLM / AutoTokenizer: max |logits - ctxjax| 8.4e-6 on 1024 tokens,
#            token ids identical to sentencepiece's (with BOS).
#            benchmarks/README.md ("LoRA / LongLoRA / LongQLoRA") compares all variants.
# int8 / nf4 (LongQLoRA, Yang 2023: a frozen quantized base, LoRA on every block projection):
# the same commands with configs/tiny_longlora.py:nf4; init_from quantizes the float run's
# kernels on load (codes + absmax, one kernel at a time) and the step differentiates only the
# trainable leaves (optim.trainable).
from configs import tiny

SEQ_LEN = 1024
PRETRAIN_SEQ_LEN = 256  # configs/tiny.py
LONGLORA_TRAINABLE = ["lora_", "embed_tokens", "norm"]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_PROJECTIONS = QKVO + ["gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "full": dict(model=dict(lora_rank=0), trainable=[]),
    "lora": dict(model=dict(lora_rank=8, lora_targets=QKVO), trainable=["lora_"]),
    "longlora": dict(model=dict(lora_rank=8, lora_targets=QKVO), trainable=LONGLORA_TRAINABLE),
    "int8": dict(model=dict(lora_rank=8, lora_targets=ALL_PROJECTIONS, base_quantization="int8"),
                 trainable=LONGLORA_TRAINABLE),
    "nf4": dict(model=dict(lora_rank=8, lora_targets=ALL_PROJECTIONS, base_quantization="nf4"),
                trainable=LONGLORA_TRAINABLE),
}


def get_config(arg: str = "longlora"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/tiny_longlora.py:{arg}; valid choices: {sorted(VARIANTS)}")
  config = tiny.get_config()
  model = config.model
  model.attention_mode = "s2"
  model.attention_options = dict(group_size=SEQ_LEN // 4)
  model.rope_scaling = dict(rope_type="linear", factor=SEQ_LEN / PRETRAIN_SEQ_LEN)
  model.lora_alpha = 16.0
  model.lora_dropout = 0.0  # LongLoRA's fine-tune.py (LongQLoRA uses 0.05)
  model.lora_targets = QKVO
  model.base_quantization = "none"
  model.quant_block_size = 64
  for key, value in VARIANTS[arg]["model"].items():
    model[key] = value
  config.data.seq_len = SEQ_LEN
  config.data.batch_size = 2
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 5
  config.optim.schedule = "constant"
  config.optim.weight_decay = 0.0  # LongLoRA fine-tunes without weight decay
  config.optim.trainable = VARIANTS[arg]["trainable"]
  config.train.steps = 60
  config.train.log_every = 10
  config.train.eval_batches = 4
  config.train.save_every = 60
  config.train.init_from = ""  # set on the command line: the workdir of a configs/tiny.py run
  return config
