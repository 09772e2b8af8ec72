# The context-extension study (`python -m ctxjax.study`): pretrain short-context models with
# four positional schemes (and GrowLength beside a fixed length), extend the RoPE model four
# ways by continual pretraining and three ways zero-shot, run Fu et al.'s five-mixture data
# ablation, evaluate every model (perplexity vs length per source, passkey and needle grids)
# and write a report that checks five published findings against the numbers.
#
# COMMAND:   bash launch/local.sh study            (= python -m ctxjax.study --workdir=runs/study)
#            python -m ctxjax.study --workdir=runs/study_full --preset=full
# HARDWARE:  2 CPU cores. quick: 5-11 min with the install, by CPU (README.md "The study");
#            full: 4x quick's training tokens and 2x its samples per heatmap cell, 11.1 min on a
#            2-core AMD EPYC Zen 4 (2026-12-05).
# EXPECTED:  runs/study/report/README.md with the tables, plots and findings (README.md quotes
#            the measured headline table).
#
# Every run is configs/tiny.py's recipe with the overrides below (nested like the training
# config). Sizes: a 2-layer, width-64 LLaMA (~0.2M parameters: 0.13M of them the vocabulary's
# embedding and head) so that the 13 training runs and 16 evaluations fit a laptop budget.
import ml_collections

from configs import tiny

MICRO = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, head_dim=16)

# Fu et al.'s five mixtures at this scale. The demo corpus is made of whole files, almost all
# longer than 1K tokens; at the extension length (4 x 128 = 512) "short" must be a length that
# splits the corpus: 16K tokens, where about half the demo tokens are in shorter documents (as
# SlimPajama is ~30% long at the paper's 4K), so upsampling has something to change. cut_short /
# cut_long are the paper's "cut at the short / long threshold" baselines, at the pretraining
# length and at the extension length.
def _mixtures(pretrain_len: int, extend_len: int) -> dict:
  up = dict(short_threshold=16384, target_context=65536, long_share=0.7)
  return {
      "cut_short": dict(kind="cut_short", short_threshold=pretrain_len,
                        target_context=extend_len),
      "cut_long": dict(kind="cut_long", short_threshold=pretrain_len,
                       target_context=extend_len),
      "global_upsample": dict(kind="global_upsample", **up),
      "per_source_upsample": dict(kind="per_source_upsample", **up),
      # Only code's long files upsampled; dropping code's shorts alone cannot lift the whole
      # corpus to 70% long (at most 54%), so its long files are repeated instead.
      "upsample_sources": dict(kind="upsample_sources", sources=["code"],
                               upsample_method="repeat_long", **up),
  }


def methods(pretrain_len: int, factor: int) -> tuple[dict, dict]:
  """(extensions, zero_shot) from pretrain_len to factor x pretrain_len. An extension is a
  nested override of the training config; a zero-shot method overrides ModelConfig keys of
  the unchanged weights."""
  extend_len = pretrain_len * factor
  scaling = dict(factor=float(factor), original_max_position_embeddings=pretrain_len)
  extensions = {
      # Chen et al. 2023 (PI): positions divided by the factor.
      "pi": dict(model=dict(rope_scaling=dict(rope_type="linear", factor=float(factor)))),
      # Peng et al. 2024 (YaRN).
      "yarn": dict(model=dict(rope_scaling=dict(rope_type="yarn", **scaling))),
      # Xiong et al. 2023 (ABF): a raised base, as Fu et al. train.
      "abf": dict(model=dict(rope_theta=500000.0)),
      # Chen et al. 2024 (LongLoRA): PI + LoRA on attention, embeddings and norms trainable,
      # S2-Attn with groups of a quarter of the length while training.
      "longlora": dict(
          model=dict(rope_scaling=dict(rope_type="linear", factor=float(factor)), lora_rank=8,
                     attention_mode="s2", attention_options=dict(group_size=extend_len // 4)),
          optim=dict(trainable=["lora_", "embed_tokens", "norm"], weight_decay=0.0)),
  }
  zero_shot = {
      # Dynamic NTK reads the original length from max_position_embeddings (as transformers).
      "dynamic_ntk": dict(rope_scaling=dict(rope_type="dynamic", factor=float(factor)),
                          max_position_embeddings=pretrain_len),
      "yarn": dict(rope_scaling=dict(rope_type="yarn", **scaling)),
      "pi": dict(rope_scaling=dict(rope_type="linear", factor=float(factor))),
      # Han et al. 2024: 4 global tokens + a window of the pretraining length.
      "lm_infinite": dict(attention_mode="lm_infinite", attention_impl="blockwise",
                          attention_options=dict(n_global=4, n_local=pretrain_len)),
  }
  return extensions, zero_shot


PRESETS = {
    # name: pretraining steps, extension steps, eval samples per cell, scored tokens per source
    "quick": dict(pretrain_steps=300, extend_steps=60, samples=2, ppl_tokens=8192),
    "full": dict(pretrain_steps=1200, extend_steps=240, samples=4, ppl_tokens=32768),
    # CI's end-to-end check: every piece of the plan, a handful of steps each.
    "smoke": dict(pretrain_steps=4, extend_steps=2, samples=1, ppl_tokens=512),
}


def get_config(preset: str = "quick"):
  if preset not in PRESETS:
    raise ValueError(f"configs/study.py argument {preset!r}; valid: {sorted(PRESETS)}")
  p = PRESETS[preset]
  pretrain_len, factor = 128, 4
  extend_len = pretrain_len * factor
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.base = tiny.get_config()
  # Overrides are nested like the training config: sections merge, values replace.
  c.base_overrides = dict(
      model=dict(MICRO, max_position_embeddings=16 * pretrain_len),
      # Every row's positions run 0..seq_len-1 (Press et al.'s setting): the per-document
      # default continues a long file's offsets, which a learned table cannot hold.
      data=dict(seq_len=pretrain_len, batch_size=16, packed_positions="continuous"),
      train=dict(steps=p["pretrain_steps"], save_every=max(1, p["pretrain_steps"] // 3),
                 keep_checkpoints=1, eval_batches=4, log_every=10),
      optim=dict(warmup_steps=20))
  c.pretrain_len = pretrain_len
  # Pretraining: one run per positional scheme at pretrain_len (Press et al. 2022's
  # comparison); "rope" is the base every extension starts from.
  c.schemes = {
      "rope": {},
      "alibi": dict(model=dict(position_embedding_type="alibi")),
      "xpos": dict(model=dict(position_embedding_type="xpos")),
      "learned": dict(model=dict(position_embedding_type="learned")),
  }
  # GrowLength (Jin et al. 2023): the same steps and tokens per step as "rope", the length
  # doubling from pretrain_len / 4 (the batch grows to keep tokens per step).
  c.growlength_lengths = [pretrain_len // 4, pretrain_len // 2, pretrain_len]
  # Extension to factor x pretrain_len by continual pretraining of "rope" (same steps and
  # tokens for each) on the per-source mixture (Fu et al. 2024).
  c.factor = factor
  c.extend_steps = p["extend_steps"]
  c.extend_overrides = dict(
      data=dict(seq_len=extend_len, batch_size=4, name="mixture", jsonl="", tfds_name="",
                tfds_data_dir="", tokenizer="", shuffle_seed=None),
      train=dict(steps=p["extend_steps"], save_every=max(1, p["extend_steps"] // 2)),
      optim=dict(learning_rate=1e-3, warmup_steps=5))
  extensions, zero_shot = methods(pretrain_len, factor)
  extensions["longlora"]["optim"]["learning_rate"] = 2e-3  # adapters start from zero
  c.extensions = extensions
  c.extension_mixture = "per_source_upsample"
  c.zero_shot = zero_shot  # "rope"'s weights with a changed model config, no training
  # Fu et al.'s data ablation: "abf" on each mixture, same steps and tokens.
  c.mixtures = _mixtures(pretrain_len, extend_len)
  c.ablation_method = "abf"
  # Evaluation lengths are absolute, so every model is on the same axis.
  c.eval = ml_collections.ConfigDict(dict(
      ppl_lengths=[pretrain_len * f // 2 for f in (1, 2, 4, 8, 16, 32)],  # 0.5x .. 16x
      retrieval_lengths=[pretrain_len * f for f in (1, 2, 4, 8)],
      depths=[0.0, 0.5, 1.0], samples=p["samples"], ppl_tokens=p["ppl_tokens"],
      tasks=["passkey", "needle"]))
  c.parallel = 2  # training / evaluation processes at once
  if preset == "smoke":  # one of each kind of item, the smallest shapes
    c.base_overrides.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2)
    c.base_overrides.data.batch_size = 2
    c.extend_overrides.data.batch_size = 1
    c.base_overrides.train.save_every = p["pretrain_steps"]  # one checkpoint per run
    c.base_overrides.train.eval_batches = 1
    c.extend_overrides.train.save_every = p["extend_steps"]
    # Each item's cost is its compiles: one item per code path. The ablation runs LongLoRA, so
    # its mixture run compiles the programs of extend_longlora (the compilation cache hits),
    # and GrowLength's last stage is pretrain_rope's program.
    for group, keep in (("schemes", ("rope",)), ("extensions", ("longlora",)),
                        ("zero_shot", ("yarn",)),
                        ("mixtures", ("cut_short", "per_source_upsample"))):
      c[group] = {k: v for k, v in c[group].items() if k in keep}
    c.ablation_method = "longlora"
    c.growlength_lengths = [pretrain_len // 2, pretrain_len]
    c.eval.update(ppl_lengths=[128, 512], retrieval_lengths=[128], depths=[0.5],
                  tasks=["passkey"])
  return c
