"""Memory / retrieval attention vs plain RoPE: passkey accuracy past the training length.

  python benchmarks/memory.py [--kinds=rope,landmark] [--steps=2000] [--multiples=1,4,8,16]
      [--samples=4] [--depths=0,0.5,1] [--out=benchmarks/results/memory.json]

Every kind trains configs/tiny_passkey.py's recipe: the demo corpus with passkey prompts mixed
in, at data.seq_len (256). The training runs in this process with ctxjax.train's trainer. Each
kind is then scored on the passkey grid of ctxjax/eval/retrieval.py at `multiples` of that
length (greedy decoding, exact-match score). A kind is one KINDS entry, so another memory
method is one more `KINDS.add(...)`. An entry has three parts: how it changes the config, the
tokenizer size it reads, and the generate function that decodes it.

  rope      the plain model (configs/tiny_passkey.py), decoded by ctxjax.eval.generate.
  landmark  landmark attention (Mohtashami & Jaggi 2023; docs/memory.md): a landmark after
            every 31 tokens, top-2 retrieval, decoded by ctxjax.model.landmark_generate.

It reports passkey accuracy per length (mean over depths and samples), the evaluation's tokens/s
per length (prompt tokens / wall seconds, compiles included), the load average and the command.
Results go to --out after every kind. Inference memory is not measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ctxjax.registry import Registry  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Kind:
  configure: Callable        # (ConfigDict) -> None, in place
  content_vocab: Callable    # model vocab_size -> the tokenizer's pieces
  generate_fn: Callable      # retrieval_grid's generate_fn


def _plain_generate(*args, **kwargs):
  from ctxjax.eval.generation import generate
  return generate(*args, **kwargs)


def _landmark_generate(model, variables, prompts, max_new_tokens, **_):
  """retrieval_grid's generate_fn for a landmark model (greedy; eos handled by the grid)."""
  from ctxjax.model.landmark_generate import landmark_generate
  return landmark_generate(model, variables, prompts, max_new_tokens)


def _landmark(config):
  from configs import tiny_landmark
  config.model.vocab_size += 1  # the landmark id: the tokenizer keeps its pieces
  config.model.attention_mode = "landmark"
  config.model.attention_options = dict(mem_freq=tiny_landmark.MEM_FREQ, top_k=2,
                                        landmark_token_id=config.model.vocab_size - 1)
  config.data.name = "mixture_landmark"


KINDS: Registry[Kind] = Registry("--kinds")
KINDS.add("rope", Kind(lambda config: None, lambda v: v, _plain_generate))
KINDS.add("landmark", Kind(_landmark, lambda v: v - 1, _landmark_generate))


def run_kind(name: str, args, workdir: str) -> dict:
  from configs import tiny_passkey
  from ctxjax.data import tokenizer as tokenizer_lib
  from ctxjax.eval import retrieval
  from ctxjax.export_hf import read_workdir
  from ctxjax.train.trainer import train
  kind = KINDS.get(name)
  config = tiny_passkey.get_config()
  config.train.update(steps=args.steps, save_every=args.steps, eval_batches=2, log_every=50)
  config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, args.steps // 10))
  kind.configure(config)
  began = time.perf_counter()
  summary = train(config, workdir)
  train_sec = time.perf_counter() - began
  model, variables, _ = read_workdir(workdir, None)
  tok = tokenizer_lib.ensure_demo_tokenizer(tiny_passkey.data_dir(),
                                            kind.content_vocab(model.cfg.vocab_size))
  seq_len = config.data.seq_len
  per_length = []
  for multiple in args.multiples:
    length = seq_len * multiple
    start = time.perf_counter()
    grid = retrieval.retrieval_grid(kind.generate_fn, model, variables, tok, "passkey",
                                    [length], args.depths, samples=args.samples,
                                    batch_size=args.batch_size, echo=lambda s: None)
    sec = time.perf_counter() - start
    per_length.append({"multiple": multiple, "length": length,
                       "passkey_accuracy": grid["mean_score"],
                       "eval_tokens_per_sec": length * len(args.depths) * args.samples / sec,
                       "loadavg": list(os.getloadavg())})
    print(f"{name}: {multiple}x ({length} tokens) passkey {grid['mean_score']:.2f} "
          f"({sec:.0f} s)", flush=True)
  return {"kind": name, "train_steps": args.steps, "train_sec": train_sec,
          "eval_loss": summary.get("eval_loss"), "final_train_loss":
          summary.get("final_train_loss"), "lengths": per_length}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ints = lambda s: [int(x) for x in s.split(",")]
  parser.add_argument("--kinds", type=lambda s: s.split(","), default=["rope", "landmark"])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--multiples", type=ints, default=[1, 4, 8, 16])
  parser.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")],
                      default=[0.0, 0.5, 1.0])
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "memory.json"))
  args = parser.parse_args(argv)
  for name in args.kinds:
    KINDS.check(name)
  from configs import tiny_passkey
  from ctxjax.data import tfds_jsonl
  if not os.path.isdir(tfds_jsonl.dataset_dir(tiny_passkey.CORPUS, tiny_passkey.data_dir())):
    tiny_passkey.build_corpus()
  results = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
             "loadavg_before": list(os.getloadavg()), "kinds": []}
  for name in args.kinds:
    with tempfile.TemporaryDirectory(prefix=f"memory-{name}-") as workdir:
      results["kinds"].append(run_kind(name, args, workdir))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
