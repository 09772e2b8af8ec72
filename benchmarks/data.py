"""Data pipeline throughput (tokens/s, CPU) against what configs/tiny.py's train step consumes.

  python benchmarks/data.py                 # T=256 (batch 8) and T=1024 (batch 2), 2048 tokens/step
  python benchmarks/data.py --no_train      # pipeline only (cite benchmarks/results/throughput.json)

The corpus is the bundled demo corpus (built on first use under $CTXJAX_DATA_DIR or
~/.cache/ctxjax) with the demo tokenizer (vocab 1024); tokenization is cached and not timed.
Each run builds a fresh ctxjax.data.pipeline.PackedBatches (document shuffle, packing, row
shuffle, grain prefetch threads) and times `--batches` batches, first batch included; the
median over `--runs` runs is reported. Each run starts at a different step (a restored state),
so runs read different rows. The train step (blockwise attention, AdamW) is timed in the same
process, on the same shapes, so the ratio is taken in one run; a train step slowed by other
jobs makes the ratio LARGER (the pipeline looks further ahead than it is), so the JSON keeps the
load average next to it. Writes benchmarks/results/data.json after every row and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import grain
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402  (benchmarks/measure.py)
from ctxjax.data import corpus, demo, pipeline  # noqa: E402
from ctxjax.data import tokenizer as tokenizer_lib  # noqa: E402

TOKENS_PER_STEP = 2048  # as configs/tiny.py and benchmarks/throughput.py
VOCAB = 1024


def demo_documents() -> tuple[list[np.ndarray], tokenizer_lib.Tokenizer]:
  tok = tokenizer_lib.ensure_demo_tokenizer(None, VOCAB)
  ids, offsets, _ = demo.load_or_tokenize(corpus.ensure_demo_corpus(None), tok)
  return [ids[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)], tok


def pipeline_tokens_per_sec(docs, tok, *, seq_len: int, batch_size: int, batches: int,
                            runs: int, num_threads: int, shard_count: int = 1) -> dict:
  """Median tokens/s that ONE process receives (its batch_size // shard_count rows)."""
  rates, startups = [], []
  for run in range(runs):
    t0 = time.perf_counter()
    p = pipeline.PackedBatches(
        docs, seq_len=seq_len, batch_size=batch_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
        pad_id=tok.pad_id, seed=run, num_threads=num_threads,
        shard=grain.sharding.ShardOptions(0, shard_count))
    state = dict(p.state, batches=run * batches)
    p.restore(state)
    startups.append(time.perf_counter() - t0)
    t = time.perf_counter()
    tokens = 0
    for _ in range(batches):
      b = next(p)
      tokens += b["inputs"].size
    rates.append(tokens / (time.perf_counter() - t))
  return {"tokens_per_sec": float(np.median(rates)), "runs": [float(r) for r in rates],
          "startup_sec": float(np.median(startups)), "rows_per_epoch": p.rows.rows_per_epoch}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="256,1024")
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--threads", default="0,2", help="grain prefetch threads to compare")
  parser.add_argument("--train_steps", type=int, default=10)
  parser.add_argument("--no_train", action="store_true")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "data.json"))
  args = parser.parse_args()

  docs, tok = demo_documents()
  print(f"demo corpus: {len(docs)} documents, {sum(len(d) for d in docs)} tokens", flush=True)
  rows = []
  out = {"date": measure.now(), "machine": measure.machine(), "jax": jax.__version__,
         "grain": getattr(grain, "__version__", None), "documents": len(docs),
         "tokens": int(sum(len(d) for d in docs)), "batches_per_run": args.batches,
         "command": " ".join(["python", *sys.argv]), "rows": rows}
  for seq_len in [int(s) for s in args.seq_lens.split(",")]:
    batch = TOKENS_PER_STEP // seq_len
    train = None
    if not args.no_train:
      import throughput  # benchmarks/throughput.py: the tiny model's train step
      load = os.getloadavg()
      train = throughput.ctxjax_tokens_per_sec(seq_len, "blockwise", args.train_steps,
                                               {})["tokens_per_sec"]
      out.setdefault("train_step_loadavg", {})[seq_len] = [list(load), list(os.getloadavg())]
    for threads in [int(t) for t in args.threads.split(",")]:
      for shards in (1, 2):
        r = pipeline_tokens_per_sec(docs, tok, seq_len=seq_len, batch_size=batch,
                                    batches=args.batches, runs=args.runs, num_threads=threads,
                                    shard_count=shards)
        rows.append({"seq_len": seq_len, "global_batch": batch, "processes": shards,
                     "threads": threads, **r, "train_step_tokens_per_sec": train,
                     # P processes each feed B/P rows per step: demand per process = train / P.
                     "pipeline_over_train": r["tokens_per_sec"] * shards / train if train
                     else None})
        out.update(finished=measure.now(), machine_after=measure.machine())
        measure.write_json(args.out, out)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "runs"}), flush=True)
  print("\n| T | batch | processes (rows/process) | threads | pipeline tokens/s (per process) "
        "| train step tokens/s | pipeline / train |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    ratio = f"{r['pipeline_over_train']:.0f}x" if r["pipeline_over_train"] else "-"
    train = f"{r['train_step_tokens_per_sec']:.0f}" if r["train_step_tokens_per_sec"] else "-"
    print(f"| {r['seq_len']} | {r['global_batch']} | {r['processes']} "
          f"({r['global_batch'] // r['processes']}) | {r['threads']} | "
          f"{r['tokens_per_sec']:.0f} | {train} | {ratio} |")


if __name__ == "__main__":
  main()
