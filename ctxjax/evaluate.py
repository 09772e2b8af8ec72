"""Evaluate a ctxjax workdir (or a Hugging Face directory) over context lengths.

  python -m ctxjax.evaluate --workdir=DIR --tasks=ppl,passkey,needle[,ruler,compress]
      [--lengths=256,512,...] [--depths=0,0.25,...] [--hf=HF_DIR] [--samples=N]

Loads the newest checkpoint of DIR (ctxjax/export_hf.py's read_workdir) and the run's
tokenizer (config.json's data.tokenizer, else the demo tokenizer), or the model and tokenizer
of --hf. Tasks:
  ppl       perplexity vs length per held-out source (ctxjax/eval/perplexity.py); default
            lengths 0.5x .. 16x the training length.
  passkey, needle, ruler (= RULER's niah_single/multikey/multivalue/multiquery)
            accuracy grids over length x depth (ctxjax/eval/retrieval.py); default lengths
            0.5x .. 4x the training length.
  compress  passkey and needle accuracy at a token budget (--compress_budget, default the
            training length) with LongLLMLingua-style compression vs truncation
            (ctxjax/eval/compress_eval.py); the scorer is --compress_workdir's model, or the
            evaluated model itself.
Writes DIR/eval/<task>.json, <task>.png and summary.md. Bad input (an unknown task, a length
past a learned/sinusoidal position table, a workdir without checkpoint or tokenizer) prints
one line and exits 2.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from ctxjax import storage
from ctxjax.eval.perplexity import PROTOCOLS
from ctxjax.eval.run import EvalInputError
from ctxjax.registry import Registry, unknown_choice

TASKS: Registry[tuple[str, ...]] = Registry("--tasks")
TASKS.add("ppl", ("ppl",))
TASKS.add("passkey", ("passkey",))
TASKS.add("needle", ("needle",))
TASKS.add("ruler", ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"))
TASKS.add("compress", ("compress_passkey", "compress_needle"))
PPL_FACTORS = (0.5, 1, 2, 4, 8, 16)
RETRIEVAL_FACTORS = (0.5, 1, 2, 4)


def define_flags() -> None:
  """The CLI's flags (defined on demand, so importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "ctxjax workdir: the model (unless --hf) and where "
                      "eval/ is written.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
  flags.DEFINE_string("hf", None, "Evaluate this Hugging Face directory instead.")
  flags.DEFINE_string("tokenizer", None, "sentencepiece .model or HF directory (default: "
                      "the run's).")
  flags.DEFINE_list("tasks", ["ppl", "passkey", "needle"], f"Any of {TASKS.names()}.")
  flags.DEFINE_list("lengths", [], "Context lengths (default: multiples of the training "
                    "length).")
  flags.DEFINE_list("depths", [], "Needle depths in [0, 1] (default 0, 0.1, ..., 1).")
  flags.DEFINE_integer("samples", 1, "Samples per (length, depth) cell.")
  flags.DEFINE_enum("ppl_protocol", "nonoverlap", PROTOCOLS.names(), "Perplexity protocol.")
  flags.DEFINE_integer("stride", None, "Sliding-window stride (default: length // 2).")
  flags.DEFINE_integer("max_tokens", 32768, "Scored tokens per source and length (ppl).")
  flags.DEFINE_integer("batch_tokens", 16384, "Tokens per forward batch (ppl).")
  flags.DEFINE_integer("batch_size", 8, "Prompts per generate call.")
  flags.DEFINE_integer("compress_budget", None, "Token budget (default: training length).")
  flags.DEFINE_string("compress_workdir", None, "Small ctxjax workdir scoring the context "
                      "(default: the evaluated model).")
  flags.DEFINE_list("compare", [], "Other workdirs whose eval/ppl.json join the ppl plot.")
  flags.DEFINE_integer("seed", 0, "Seed of the synthetic prompts.")
  flags.mark_flags_as_required(["workdir"])


def parse_tasks(names) -> list[str]:
  try:
    tasks = [TASKS.check(n.strip()) for n in names if n.strip()]
  except ValueError as e:
    raise EvalInputError(str(e)) from None
  if not tasks:
    raise EvalInputError(unknown_choice("--tasks", "", TASKS))
  return tasks


def _numbers(values, kind, flag):
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise EvalInputError(f"--{flag}={','.join(values)}: not a list of {kind.__name__}s") \
        from None


def _generate_fn():
  """ctxjax.eval.generate (the kv-cache generator), a function or a module of that name."""
  try:
    from ctxjax.eval import generate  # noqa: PLC0415
  except ImportError as e:
    raise EvalInputError(f"retrieval tasks need ctxjax.eval.generate ({e})") from None
  return getattr(generate, "generate", generate)


def _progress(total: int):
  from tqdm import tqdm  # noqa: PLC0415
  return tqdm(total=total, desc="eval", unit="cell", disable=not sys.stderr.isatty())


def _write_json(out_dir: str, name: str, result) -> None:
  storage.write_text(storage.join(out_dir, f"{name}.json"), json.dumps(result, indent=1))


def run_ppl(run, out_dir, lengths, f, docs):
  from ctxjax.eval import perplexity, plots  # noqa: PLC0415
  bar = _progress(len(lengths) * len(docs))
  res = perplexity.perplexity_vs_length(
      perplexity.nll_fn_from_model(run.model, run.variables), docs, lengths,
      bos_id=run.tokenizer.bos_id, protocol=f.ppl_protocol, stride=f.stride,
      batch_tokens=f.batch_tokens, max_tokens=f.max_tokens, model=run.name,
      progress=bar.update)
  bar.close()
  res["train_length"] = run.train_length
  _write_json(out_dir, "ppl", res)
  others = []
  for d in f.compare:
    path = storage.join(d, "eval", "ppl.json")
    if storage.isfile(path):
      others.append(storage.read_json(path))
    else:
      print(f"--compare: {path} not found; left out of the plot")
  everyone = [res] + others
  plots.perplexity_plot(everyone, storage.join(out_dir, "ppl.png"),
                        [r.get("train_length") for r in everyone])
  return res


def run_retrieval(run, out_dir, task, lengths, depths, f, haystack):
  from ctxjax.eval import plots, retrieval  # noqa: PLC0415
  bar = _progress(len(lengths) * len(depths) * f.samples)
  res = retrieval.retrieval_grid(
      _generate_fn(), run.model, run.variables, run.tokenizer, task, lengths, depths,
      samples=f.samples, haystack=haystack, batch_size=f.batch_size, seed=f.seed,
      model_name=run.name, progress=bar.update)
  bar.close()
  _write_json(out_dir, task, res)
  plots.retrieval_heatmap(res, storage.join(out_dir, f"{task}.png"), run.train_length)
  return res


def run_compress(run, out_dir, task, lengths, f, haystack):
  from ctxjax.eval import compress, compress_eval  # noqa: PLC0415
  from ctxjax.eval.run import load_run  # noqa: PLC0415
  small = load_run(f.compress_workdir) if f.compress_workdir else run
  scorer = compress.model_token_scorer(small.model, small.variables)
  budget = f.compress_budget or run.train_length
  bar = _progress(2 * len(lengths))
  res = compress_eval.compression_eval(
      _generate_fn(), run.model, run.variables, run.tokenizer, scorer, task,
      [L for L in lengths if L > budget] or [2 * budget], budget, samples=f.samples,
      haystack=haystack, batch_size=f.batch_size, seed=f.seed, model_name=run.name,
      progress=bar.update)
  bar.close()
  _write_json(out_dir, f"compress_{task}", res)
  return res


def evaluate(f) -> str:
  """Runs the tasks of flags `f`; returns the summary path."""
  from ctxjax.eval import perplexity, retrieval, summary  # noqa: PLC0415
  from ctxjax.eval.run import check_lengths, held_out, load_run  # noqa: PLC0415
  tasks = parse_tasks(f.tasks)
  lengths = _numbers(f.lengths, int, "lengths")
  depths = _numbers(f.depths, float, "depths") or list(retrieval.DEFAULT_DEPTHS)
  if any(not 0 <= d <= 1 for d in depths):
    raise EvalInputError(f"--depths={f.depths}: fractions in [0, 1]")
  run = load_run(f.workdir, step=f.step, hf_dir=f.hf, tokenizer_path=f.tokenizer)
  ppl_lengths = lengths or perplexity.default_lengths(run.train_length, PPL_FACTORS)
  grid_lengths = lengths or perplexity.default_lengths(run.train_length, RETRIEVAL_FACTORS)
  if "ppl" in tasks:
    check_lengths(run.model.cfg, ppl_lengths)
  if set(tasks) - {"ppl"}:
    check_lengths(run.model.cfg, grid_lengths,
                  extra=1 + max(retrieval.MAX_NEW_TOKENS.values()))
  out_dir = storage.join(f.workdir, "eval")
  storage.makedirs(out_dir)
  docs, haystack = held_out(run)
  for task in tasks:
    for sub in TASKS.get(task):
      sub = sub[len("compress_"):] if sub.startswith("compress_") else sub
      if sub != "ppl" and min(grid_lengths) <= (need := retrieval.min_length(
          run.tokenizer, sub, haystack)):
        raise EvalInputError(f"--lengths={min(grid_lengths)} is too short for {sub}: its "
                             f"prompt needs more than {need} tokens without filler")
  results, pngs = {}, {}
  for task in tasks:
    for sub in TASKS.get(task):
      if sub == "ppl":
        results[sub] = run_ppl(run, out_dir, ppl_lengths, f, docs)
      elif sub.startswith("compress_"):
        results[sub] = run_compress(run, out_dir, sub[len("compress_"):], grid_lengths, f,
                                    haystack)
        continue
      else:
        results[sub] = run_retrieval(run, out_dir, sub, grid_lengths, depths, f, haystack)
      pngs[sub] = f"{sub}.png"
  return summary.write_summary(storage.join(out_dir, "summary.md"), run.name,
                               run.train_length, results, pngs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  from ctxjax import cli  # noqa: PLC0415
  f = flags.FLAGS
  if not f.hf:
    cli.input_dir(f.workdir, "--workdir", "a training run's or import_hf's workdir (or --hf)")
  cli.output_dir(storage.join(f.workdir, "eval"), "--workdir")
  path = evaluate(f)  # bad input: one line, exit 2 (ctxjax/cli.py)
  print(f"wrote {path}")


if __name__ == "__main__":
  from ctxjax import cli
  define_flags()
  cli.run("ctxjax.evaluate", main)
