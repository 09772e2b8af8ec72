# A 2-layer version of configs/tiny.py (same tokenizer and optimizer) trained at 256 tokens on
# the demo corpus with passkey prompts (Mohtashami & Jaggi 2023, ctxjax/data/synthetic.py)
# mixed in, to learn retrieval at its training length; `python -m ctxjax.evaluate` shows it.
#
# COMMAND:   python -m configs.tiny_passkey      # once: writes and prepares the corpus
#            python -m ctxjax.train --config=configs/tiny_passkey.py --workdir=runs/passkey
#            python -m ctxjax.evaluate --workdir=runs/passkey --tasks=ppl,passkey \
#              --lengths=128,256,512,1024 --depths=0,0.25,0.5,0.75,1 --samples=4 --batch_size=20
# HARDWARE:  2 CPU cores; see EXPECTED for the time.
# EXPECTED:  measured 2026-12-05 (2 loaded CPU cores, 19 min, ~4.7K tokens/s): eval_loss 4.33;
#            passkey accuracy 0.00 at 256 (digits right, order wrong), 0.25 at 128: the model
#            does NOT yet retrieve at its training length (docs/evaluation.md, worked example).
#
# The corpus (prepared once under $CTXJAX_DATA_DIR or ~/.cache/ctxjax, as a tfds dataset of
# ctxjax/data/tfds_jsonl.py): train = the demo corpus' training documents plus NUM_SAMPLES
# passkey prompts + answers of 112..250 tokens (so most fit in one 256-token row) at uniform
# depths; validation = the demo corpus' held-out documents only, so the trainer's eval_loss and
# the evaluation's perplexity are on demo text, comparable with configs/tiny.py.
import os

from configs import tiny

CORPUS = "tiny_passkey_v2"       # a changed recipe needs a new name (tfds reuses a prepared one)
NUM_SAMPLES = 20000              # ~3.6M passkey tokens next to ~0.7M demo training tokens
DEMO_EVERY = 4                   # every 4th demo training document: passkey rows ~85% of tokens
PASSKEY_LENGTHS = range(112, 251)  # prompt tokens; 111 is the shortest passkey prompt


def data_dir() -> str:
  from ctxjax.data import corpus  # noqa: PLC0415
  return corpus.default_data_dir()


def get_config():
  config = tiny.get_config()
  # Half the depth and width of configs/tiny.py (0.66M parameters, ~5x fewer FLOPs per
  # token): two layers are enough for the induction-style copy that retrieval needs (Olsson et
  # al. 2022), and the run fits a few CPU minutes.
  config.model.update(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=32)
  config.data.name = "mixture"
  config.data.tfds_name = f"jsonl_corpus/{CORPUS}:1.0.0"
  config.data.tfds_data_dir = data_dir()
  config.data.tfds_text_feature = "text"
  config.data.tfds_source_feature = "source"  # code / docs / legal / synthetic_passkey
  config.data.tfds_eval_split = "validation"
  config.data.tokenizer = ""                  # the demo tokenizer (model.vocab_size pieces)
  config.data.mixture = None
  config.data.shuffle_seed = None
  config.train.steps = 2000
  config.train.save_every = 250
  return config


def build_corpus(num_samples: int = NUM_SAMPLES, seed: int = 0) -> str:
  """Writes the train / validation JSONL and prepares them as tfds `CORPUS`; returns its dir."""
  from ctxjax.data import corpus, demo, synthetic, tfds_jsonl  # noqa: PLC0415
  from ctxjax.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  root = data_dir()
  tok = tokenizer_lib.ensure_demo_tokenizer(root, tiny.get_model_config().vocab_size)
  docs = list(corpus.read_jsonl(corpus.ensure_demo_corpus(root)))
  held = set(demo.validation_documents([s for _, s in docs]).tolist())
  out = os.path.join(root, CORPUS)
  os.makedirs(out, exist_ok=True)
  rows = lambda idx: ({"text": docs[i][0], "meta": {"redpajama_set_name": docs[i][1]}}
                      for i in idx)
  passkeys = synthetic.synthetic_records(tok, "passkey", num_samples=num_samples,
                                         lengths=PASSKEY_LENGTHS, seed=seed)
  train, valid = os.path.join(out, "train.jsonl"), os.path.join(out, "validation.jsonl")
  train_idx = [i for i in range(len(docs)) if i not in held][::DEMO_EVERY]
  synthetic.write_jsonl(train, (r for part in (rows(train_idx), passkeys) for r in part))
  synthetic.write_jsonl(valid, rows(sorted(held)))
  tfds_jsonl.build_jsonl_corpus(CORPUS, [train], data_dir=root, validation_files=[valid])
  return tfds_jsonl.dataset_dir(CORPUS, root)


if __name__ == "__main__":
  print(f"prepared {build_corpus()}")
