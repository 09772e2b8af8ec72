# Landmark attention (Mohtashami & Jaggi 2023) on configs/tiny.py: a landmark token after every
# 31 tokens (blocks of 32 slots, 8 per 256-slot row), the grouped softmax in training, top-2
# block retrieval per head and layer at inference (docs/memory.md, "Landmark attention").
#
# COMMAND:   python -m ctxjax.train --config=configs/tiny_landmark.py --workdir=runs/landmark
# HARDWARE:  2 CPU cores; a few minutes (see EXPECTED).
# EXPECTED:  not yet measured on a full run (docs/memory.md says what was run); the loss falls
#            like configs/tiny.py's. eval_loss is measured with top-2 retrieval (train=False),
#            the training loss with every past block.
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
