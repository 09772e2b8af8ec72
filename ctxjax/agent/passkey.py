"""Passkey retrieval beyond the window through archival memory, with a real ctxjax model.

  python -m ctxjax.agent.passkey --out=DIR [--workdir=RUN] [--samples=50] [--factor=8]

A passkey document (Mohtashami & Jaggi 2023) `factor` times the model's window (its training
length) is split into pages that fit the window with the prompt's header and question
(overlapping so the needle line lies whole in some page), and the pages are inserted into
an archival store (store.py) embedded with the model's own mean-pooled hidden states
(embed.py). The controller is scripted (a tiny model cannot write function calls): it issues
the JSON call {"function": "archival_search", "arguments": {"query": <the question>,
"mode": ...}} through functions.execute, takes the top page, and the model answers
`header + page + question` with `generate`. Reported beside it: the same with text search,
the needle's own page (an oracle: retrieval perfect), and the truncated document (its last
window fed directly). Without --workdir the tiny passkey model of passkey_model.py is
trained first (~1 minute). Writes DIR/agent_passkey.json and DIR/session/ (sample 0's stores).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import flags

from ctxjax import cli
from ctxjax.agent import functions
from ctxjax.agent.agent import Agent
from ctxjax.agent.context import Budget, WorkingContext
from ctxjax.agent.session import Session
from ctxjax.agent.store import Store

MODES = ("embedding", "embedding_centered", "text")


def define_flags() -> None:
  flags.DEFINE_string("out", None, "Directory for agent_passkey.json and session/.")
  flags.DEFINE_string("workdir", None, "A ctxjax run (its newest checkpoint and tokenizer); "
                      "default: train the tiny passkey model first.")
  flags.DEFINE_integer("samples", 50, "Documents (needle depths uniform, seeded).")
  flags.DEFINE_integer("factor", 8, "Document length / the model's window.")
  flags.DEFINE_integer("steps", 300, "Training steps of the tiny model (no --workdir).")
  flags.DEFINE_integer("seed", 0, "Seed of the documents.")


def paginate_document(tok, sample, window: int):
  """(header ids, question ids, pages [(start, ids)] of the body, needle span in the body).
  Pages hold window - header - question tokens; their stride leaves room for the needle
  line, so it lies whole in at least one page."""
  from ctxjax.data import synthetic  # noqa: PLC0415  (jax-free flag errors stay fast)
  head = tok.encode(synthetic.PASSKEY_HEADER)
  question = tok.encode(synthetic.PASSKEY_QUESTION)
  ids = sample.prompt_ids.tolist()
  body = ids[len(head):len(ids) - len(question)]
  size = window - len(head) - len(question)
  needle = len(tok.encode(synthetic.PASSKEY_NEEDLE.format(k=50000)))
  if size <= needle:
    raise ValueError(f"the window ({window} tokens) leaves {size} tokens per page, not more "
                     f"than the needle's {needle}; use a model with a longer training length")
  stride = size - needle
  starts = list(range(0, max(len(body) - size, 0) + 1, stride))
  if starts[-1] + size < len(body):
    starts.append(len(body) - size)
  a, b = sample.metadata["needle_spans"][0]
  return head, question, [(s, body[s:s + size]) for s in starts], (a - len(head), b - len(head))


def _null_summary(old: str, evicted) -> str:
  return old  # the command never overflows its working context


def run(model, variables, tok, window: int, *, samples: int, factor: int, seed: int,
        out: str, echo=print) -> dict:
  from ctxjax.agent.embed import hidden_state_embedder  # noqa: PLC0415
  from ctxjax.data import synthetic  # noqa: PLC0415
  from ctxjax.eval import generate, retrieval, scoring  # noqa: PLC0415
  embed = hidden_state_embedder(model, variables, tok, max_tokens=window + 1)
  rng = np.random.default_rng([seed, 1])
  prompts = {k: [] for k in ("truncated", "oracle", *MODES)}
  hits = {m: 0 for m in MODES}
  records = []
  for i in range(samples):
    s = synthetic.passkey_sample(tok, length=factor * window, depth=float(rng.uniform()),
                                 seed=[seed, i])
    head, question, pages, (na, nb) = paginate_document(tok, s, window)
    budget = Budget(window=1 << 16, core_limit=64, summary_limit=64)
    context = WorkingContext("scripted passkey controller", budget, Store(), _null_summary)
    session = Session(os.path.join(out, "session"), context, Store(embed))
    agent = Agent(lambda prompt: "", session, page_size=1)
    session.archival.insert_many([tok.decode(p) for _, p in pages],
                                 [{"start": st, "tokens": p} for st, p in pages])
    rec = {"sample": i, "passkey": s.answers[0], "depth": s.metadata["depth"],
           "pages": len(pages)}
    for mode in MODES:
      call = {"function": "archival_search", "arguments": {
          "query": synthetic.PASSKEY_QUESTION.strip(), "mode": mode}}
      line, _ = functions.execute(agent, json.dumps(call))
      top = json.loads(line)["result"]["results"][0]
      start = top["meta"]["start"]
      hit = start <= na and nb <= start + len(top["meta"]["tokens"])
      hits[mode] += hit
      rec[f"{mode}_page"], rec[f"{mode}_hit"] = start, bool(hit)
      prompts[mode].append(head + top["meta"]["tokens"] + question)
    holding = [p for st, p in pages if st <= na and nb <= st + len(p)]
    rec["chance_hit"] = len(holding) / len(pages)  # a random page holds the whole needle
    oracle = holding[0]
    prompts["oracle"].append(head + oracle + question)
    prompts["truncated"].append(s.prompt_ids.tolist()[-window:])
    records.append(rec)
    if i == 0:
      session.save()
  eos = tok.eos_id if tok.eos_id >= 0 else None
  accuracy = {}
  for name, rows in prompts.items():
    batch = [np.asarray([tok.bos_id, *r], np.int32) for r in rows]
    outs = retrieval.generate_batch(generate, model, variables, batch,
                                    retrieval.MAX_NEW_TOKENS.get("passkey"), eos)
    scores = []
    for rec, ids in zip(records, outs):
      pred = tok.decode(ids)
      scores.append(scoring.passkey_match(pred, [rec["passkey"]]))
      rec[f"{name}_prediction"] = pred
    accuracy[name] = float(np.mean(scores))
    echo(f"{name:>10}: accuracy {accuracy[name]:.3f}")
  retrieval_hits = {m: hits[m] / samples for m in MODES}
  retrieval_hits["random_page"] = float(np.mean([r["chance_hit"] for r in records]))
  echo(f"retrieval top-1 page holds the needle: {retrieval_hits}")
  return {"window": window, "document_tokens": factor * window, "factor": factor,
          "samples": samples, "pages_per_document": records[0]["pages"],
          "accuracy": accuracy, "retrieval_top1_hit": retrieval_hits, "records": records}


def main(argv) -> None:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; flags only")
  f = flags.FLAGS
  if not f.out:
    raise cli.UserError("--out is required: a directory for agent_passkey.json")
  out = cli.output_dir(f.out, "--out")
  if f.samples < 1 or f.factor < 1:
    raise cli.UserError(f"--samples={f.samples} and --factor={f.factor} must be >= 1")
  t0 = time.time()
  if f.workdir:
    from ctxjax.eval.run import load_run  # noqa: PLC0415
    run_ = load_run(cli.input_dir(f.workdir, "--workdir", "a ctxjax run directory"))
    model, variables, tok, window, loss = (run_.model, run_.variables, run_.tokenizer,
                                           run_.train_length, None)
  else:
    from ctxjax.agent.passkey_model import trained_tiny_model  # noqa: PLC0415
    model, variables, tok, window, loss = trained_tiny_model(steps=f.steps)
    print(f"trained the tiny passkey model: {f.steps} steps, final loss {loss:.4f}")
  result = run(model, variables, tok, window, samples=f.samples, factor=f.factor,
               seed=f.seed, out=out)
  result.update(model=f.workdir or "tiny passkey model (ctxjax/agent/passkey_model.py)",
                train_loss=loss, seconds=round(time.time() - t0, 1),
                load=os.getloadavg()[0], command=" ".join(sys.argv))
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "agent_passkey.json")
  with open(path, "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  define_flags()
  cli.run("ctxjax.agent.passkey", main)
