# configs/llama2_7b_80k.py (Fu et al. 2024: LLaMA-2 7B at 80K, per-source upsampled mixture,
# constant LR 2e-5, ~4M tokens per step, 5B tokens) on one 8xH100-80GB node.
#
# COMMAND:   python -m ctxjax.train --config=configs/llama2_7b_8xh100.py[:ring] --workdir=DIR
#            (a SLURM cluster: sbatch --nodes=1 launch/slurm.sh --config=... --workdir=...)
# CHECK:     python -m ctxjax.aot --config=configs/llama2_7b_8xh100.py[:ring]
#            (shapes and shardings on 8 fake CPU devices; no GPU memory verdict)
# HARDWARE:  8x H100 80GB. Argument (the layout):
#              cudnn (default)  fsdp 4 x tensor 2, attention_impl "auto" = cuDNN flash attention
#                               on GPU (bf16, causal, head_dim 128); one 80K row per GPU;
#              ring             fsdp 2 x context 2 x tensor 2, ring attention (blockwise kernel):
#                               half a row (40K tokens) per GPU, for when cudnn runs out of memory.
# EXPECTED:  AOT CPU check (measured 2026-11-22, benchmarks/README.md "AOT pod checks"): both
#            layouts compile; XLA:CPU's per-device memory (bf16 computed as f32 on CPU, so an
#            upper indication, not a GPU verdict): cudnn 79.9 GiB (over the H100's 74.5 GiB),
#            ring 63.7 GiB; est. 209 s/step at MFU 0.4 (8 x 989 TFLOP/s), 1272 steps in ~74 h.
import ml_collections

from configs import _llama2, llama2_7b_80k

LAYOUTS = {
    # Tensor parallelism splits heads, MLP width and vocab (logits) over 2 GPUs; fsdp shards the
    # weights and AdamW state over the other 4. 48 rows = 12 micro-batches of 4 rows.
    "cudnn": dict(mesh=dict(ici_fsdp=4, ici_tensor=2), attention_impl="auto", grad_accum=12),
    # Each 80K row also splits over 2 GPUs (context parallelism): 24 micro-batches of 2 rows.
    "ring": dict(mesh=dict(ici_fsdp=2, ici_context=2, ici_tensor=2), attention_impl="ring",
                 grad_accum=24),
}


def get_config(arg: str = "cudnn"):
  if arg not in LAYOUTS:
    raise ValueError(f"configs/llama2_7b_8xh100.py:{arg}; valid choices: {sorted(LAYOUTS)}")
  layout = LAYOUTS[arg]
  config = llama2_7b_80k.get_config()
  config.model = _llama2.model("7b", max_position_embeddings=llama2_7b_80k.SEQ_LEN,
                               rope_theta=5e5, attention_impl=layout["attention_impl"])
  config.mesh = _llama2.mesh(**layout["mesh"])
  config.train.grad_accum_steps = layout["grad_accum"]
  config.aot = ml_collections.ConfigDict(dict(devices="cpu:8"))  # 8 GPUs, checked on CPU
  return config
