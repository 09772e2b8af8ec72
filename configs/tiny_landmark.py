# Landmark attention (Mohtashami & Jaggi 2023) on configs/tiny.py: a landmark token after every
# 31 tokens (blocks of 32 slots, 8 per 256-slot row), the grouped softmax in training, top-2
# block retrieval per head and layer at inference (docs/memory.md, "Landmark attention").
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_landmark.py --workdir=runs/landmark
# HARDWARE:  2 CPU cores; ~15 min at 300 steps on a loaded machine (see EXPECTED).
# EXPECTED:  measured 2026-12-05, 100 steps only (--config.train.steps=100, nice 10, 2 cores at
#            load 8-14, median 313 tokens/s): train loss 6.98 -> 5.16, eval_loss 5.616 with top-2
#            retrieval (5.615 reading all 7 past blocks) vs unigram entropy 5.955. The full
#            300-step run was not measured. eval_loss uses top-2 retrieval (train=False); the
#            training loss uses every past block.
#
# The vocabulary is the demo tokenizer's 1024 pieces + the landmark id 1024 (vocab_size 1025):
# data.name "demo_landmark" packs content rows with the 1024-piece tokenizer and inserts the
# landmarks (ctxjax/data/landmark.py). Generation: ctxjax.model.landmark_generate.
from configs import tiny

MEM_FREQ = 31


def get_config():
  config = tiny.get_config()
  config.model.vocab_size = 1025
  config.model.attention_mode = "landmark"
  config.model.attention_options = dict(mem_freq=MEM_FREQ, top_k=2, landmark_token_id=1024)
  config.data.name = "demo_landmark"
  return config
