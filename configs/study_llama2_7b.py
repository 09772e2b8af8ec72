# The study at scale: LLaMA-2 7B (4K) extended to 80K on the per-source mixture (Fu et al.
# 2024) with PI, YaRN, ABF and LongLoRA, the data ablation's five mixtures, and zero-shot
# dynamic NTK / YaRN / PI / LM-Infinite, with the same plan, items and report as
# configs/study.py (no pretraining items: the base is the Hugging Face checkpoint).
#
# COMMAND:   python -m ctxjax.study --config=configs/study_llama2_7b.py --aot
#              (compiles every training item for config.aot.topology on this CPU host: fits?)
#            python -m ctxjax.study --config=configs/study_llama2_7b.py --workdir=DIR
#              (on a host that can train them; see docs/study.md "At scale")
# HARDWARE:  training: a TPU v5p-128 slice per item (the sequence over 4 chips: ring attention,
#            LongLoRA all_gather);
#            the AOT check: any CPU host with libtpu (`pip install -e ".[tpu-aot]"`).
# EXPECTED:  the AOT check prints per-chip HBM of each distinct training item; measured
#            results are in docs/study.md "At scale" (no slice was used: nothing trained).
import ml_collections

from configs import llama2_7b_80k, study

PRETRAIN_LEN = 4096             # LLaMA-2's context
FACTOR = 20                     # 4096 x 20 = 81920 (Fu et al.'s 80K)
EXTEND_STEPS = 128              # 128 x 48 x 81920 = 503M tokens per run (Fu et al.: 500M
                                # tokens already pass the needle test at 80K, their Fig. 4)


def get_config(arg: str = ""):
  del arg
  extend_len = PRETRAIN_LEN * FACTOR
  recipe = llama2_7b_80k.get_config()
  c = ml_collections.ConfigDict()
  c.preset = "llama2_7b"
  c.base = recipe
  c.base_hf = recipe.train.init_from_hf  # SET: a local LLaMA-2 7B HF directory
  c.base_overrides = dict(model=dict(rope_theta=10000.0),  # LLaMA-2's base; ABF raises it
                          train=dict(steps=EXTEND_STEPS, init_from_hf=""))
  c.pretrain_len = PRETRAIN_LEN
  c.schemes = {}
  c.growlength_lengths = []
  c.factor = FACTOR
  c.extend_steps = EXTEND_STEPS
  c.extend_overrides = dict(data=dict(seq_len=extend_len))
  c.extensions, c.zero_shot = study.methods(PRETRAIN_LEN, FACTOR)
  # S2-Attn on the all_gather context-parallel kernel: K/V gathered over "context" once per
  # layer, each chip's queries attend only their S2 groups (blockwise skips the rest). The AOT
  # check (2026-12-05): 89.3 GiB per chip, 163 s/step predicted, memory-bound, as the other
  # extensions; on "blockwise" GSPMD gathered inside the kernel's loops instead (25 PB of
  # all-gathers, 1.1e5 s/step) and on "ring" it needs 106.4 GiB (does not fit).
  c.extensions.longlora.model.attention_impl = "all_gather"
  c.extension_mixture = "per_source_upsample"
  up = dict(short_threshold=4096, target_context=extend_len, long_share=0.7)
  c.mixtures = {
      "cut_short": dict(kind="cut_short", short_threshold=4096, target_context=extend_len),
      "cut_long": dict(kind="cut_long", short_threshold=4096, target_context=extend_len),
      "global_upsample": dict(kind="global_upsample", **up),
      "per_source_upsample": dict(kind="per_source_upsample", **up),
      "upsample_sources": dict(kind="upsample_sources", sources=["github", "arxiv", "book"],
                               upsample_method="repeat_long", **up),
  }
  c.ablation_method = "abf"
  c.eval = ml_collections.ConfigDict(dict(
      ppl_lengths=[2048, 4096, 16384, 32768, 65536, 81920],
      retrieval_lengths=[4096, 16384, 32768, 65536, 81920],
      depths=[0.0, 0.25, 0.5, 0.75, 1.0], samples=4, ppl_tokens=1 << 20,
      tasks=["passkey", "needle"]))
  c.parallel = 1
  c.aot = ml_collections.ConfigDict(dict(topology=recipe.aot.topology))
  return c
