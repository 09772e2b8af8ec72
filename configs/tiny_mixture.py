# The data recipe of Fu et al. (2024) at CPU scale: the tiny model continually trained at
# 1024 tokens on a length-upsampled mixture of the demo corpus (code / docs / legal), through
# the tfds -> sentencepiece -> mixture -> grain pipeline (data.name="mixture").
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_mixture.py:per_source_upsample \
#              --workdir=runs/mix  [--config.train.init_from=runs/tiny]
#            (argument: cut_short | cut_long | global_upsample | per_source_upsample |
#             upsample_sources; the workdir gets mixture_stats.json/.png, per source before/after)
# HARDWARE:  2 CPU cores, a few minutes.
# EXPECTED:  per_source_upsample on the training documents keeps each source's token share
#            (code 0.301, docs 0.376, legal 0.324) while the long share rises 0.476 -> 0.700
#            (measured 2026-11-22, WORKDIR/mixture_stats.json).
#
# The threshold: the demo corpus is made of whole files, so at the paper's ratio (4K "short" vs
# a 128K target) scaled to 1K, almost every token (99.9%) is already "long"; 16K tokens is where
# the demo corpus is about half long, as SlimPajama is at 4K (~30% long).
from configs import tiny

MIXTURES = {
    "cut_short": dict(kind="cut_short", short_threshold=256, target_context=1024),
    "cut_long": dict(kind="cut_long", short_threshold=256, target_context=1024),
    "global_upsample": dict(kind="global_upsample", short_threshold=16384,
                            target_context=65536, long_share=0.7),
    "per_source_upsample": dict(kind="per_source_upsample", short_threshold=16384,
                                target_context=65536, long_share=0.7),
    "upsample_sources": dict(kind="upsample_sources", short_threshold=16384,
                             target_context=65536, long_share=0.7, sources=["code"]),
}


def get_config(arg: str = "per_source_upsample"):
  if arg not in MIXTURES:
    raise ValueError(f"configs/tiny_mixture.py argument {arg!r}; valid: {sorted(MIXTURES)}")
  config = tiny.get_config()
  config.data.name = "mixture"
  config.data.seq_len = 1024
  config.data.batch_size = 2           # 2048 tokens per step, as configs/tiny.py
  config.data.jsonl = ""               # "" = the demo corpus; or SlimPajama-shaped JSONL file(s)
  config.data.tfds_name = ""           # or a prepared tfds dataset with a text feature
  config.data.tfds_data_dir = ""
  config.data.tokenizer = ""           # "" = the demo tokenizer; or .model / a HF directory
  config.data.mixture = MIXTURES[arg]
  config.data.shuffle_seed = None
  config.train.steps = 200
  return config
