# The tiny model with each long-context attention pattern of the survey, on the blockwise kernel
# (the patterns' masked blocks are skipped, so windowed/Lambda attention costs O(T*w)).
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_attention.py:s2 --workdir=runs/s2
#            (argument: window | lambda | block_causal | sinks | s2 | dilated | lm_infinite)
# HARDWARE:  2 CPU cores, a few minutes at seq_len 512.
# EXPECTED:  trains like configs/tiny.py; s2 evaluates with full attention (LongLoRA);
#            lm_infinite/lambda match causal attention inside the local window.
from configs import tiny

SEQ_LEN = 512
VARIANTS = {
    "window": dict(attention_pattern=dict(kind="sliding_window", window=128)),
    # LM-Infinite's Lambda mask alone (Han et al. 2024) ...
    "lambda": dict(attention_pattern=dict(kind="lambda", n_global=8, n_local=128)),
    # ... and with the distance ceiling (global keys unrotated, queries at distance n_local).
    "lm_infinite": dict(attention_mode="lm_infinite",
                        attention_options=dict(n_global=8, n_local=128)),
    "block_causal": dict(position_embedding_type="xpos",
                         attention_pattern=dict(kind="block_causal", block_size=128)),
    "sinks": dict(attention_pattern=dict(kind="attention_sinks", sink_size=4, window=128)),
    # LongLoRA S2-Attn: groups of SEQ_LEN/4, half the heads shifted by half a group.
    "s2": dict(attention_mode="s2", attention_options=dict(group_size=SEQ_LEN // 4)),
    "dilated": dict(attention_mode="dilated", attention_options=dict(
        segment_lengths=[128, 256, 512], dilation_rates=[1, 2, 4])),
}


def get_config(arg: str = "window"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/tiny_attention.py:{arg}; valid choices: {sorted(VARIANTS)}")
  config = tiny.get_config()
  config.model.attention_impl = "blockwise"
  for key, value in VARIANTS[arg].items():
    config.model[key] = value
  config.data.seq_len = SEQ_LEN
  config.data.batch_size = 4
  return config
