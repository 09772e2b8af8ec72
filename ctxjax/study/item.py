"""One item of a study, run in its own process by the scheduler:

  python -m ctxjax.study.item --workdir=DIR --name=train:extend_pi

A train item trains DIR/runs/<model> with ctxjax.train's trainer (which resumes from the run's
newest checkpoint: a killed item continues where it stopped); an eval item scores a model on
perplexity vs length per source and the retrieval grids and writes DIR/evals/<model>/. Either
ends by writing `done.json` (wall time, the item's result paths): the scheduler's record that
the item is finished.
"""
from __future__ import annotations

import json
import os
import time

from ctxjax import storage
from ctxjax.study import plan as plan_lib

DONE = "done.json"


def runs_dir(workdir: str) -> str:
  return os.path.join(workdir, "runs")


def out_dir(workdir: str, item: plan_lib.Item) -> str:
  return os.path.join(workdir, "runs" if item.kind == "train" else "evals", item.model)


def is_done(workdir: str, item: plan_lib.Item) -> bool:
  return os.path.isfile(os.path.join(out_dir(workdir, item), DONE))


def read_study(workdir: str):
  import ml_collections  # noqa: PLC0415
  return ml_collections.ConfigDict(storage.read_json(os.path.join(workdir, "study.json")))


def train_config(study, item: plan_lib.Item, workdir: str):
  overrides = plan_lib.merged(item.overrides)
  init = overrides.get("train", {}).get("init_from", "")
  if init:
    overrides["train"]["init_from"] = init.replace("<runs>", runs_dir(workdir))
  return plan_lib.apply_overrides(study.base, overrides)


def run_train(study, item, workdir: str) -> dict:
  from ctxjax.train import logs  # noqa: PLC0415
  from ctxjax.train.trainer import train  # noqa: PLC0415
  where = out_dir(workdir, item)
  logs.setup(where, "train")
  summary = train(train_config(study, item, workdir), where)
  return {"summary": summary}


def _model_with(run, overrides: dict):
  """The run's model with ModelConfig keys replaced (a zero-shot change: no new weights)."""
  from ctxjax.model import Transformer, model_config_from_dict  # noqa: PLC0415
  if not overrides:
    return run.model
  cfg = dict(run.model.cfg.to_dict(), **{k: v for k, v in overrides.items()})
  return Transformer(model_config_from_dict(cfg))


def run_eval(study, item, workdir: str) -> dict:
  from ctxjax.eval import generate, perplexity, plots, retrieval  # noqa: PLC0415
  from ctxjax.eval.run import held_out, load_run  # noqa: PLC0415
  where = out_dir(workdir, item)
  os.makedirs(where, exist_ok=True)
  run = (load_run("", hf_dir=item.source[len("hf:"):]) if item.source.startswith("hf:")
         else load_run(os.path.join(runs_dir(workdir), item.source)))
  model = _model_with(run, dict(item.model_overrides or {}))
  ev = study.eval
  docs, haystack = held_out(run)
  ppl = perplexity.perplexity_vs_length(
      perplexity.nll_fn_from_model(model, run.variables), docs, list(ev.ppl_lengths),
      bos_id=run.tokenizer.bos_id, protocol="nonoverlap", batch_tokens=8192,
      max_tokens=int(ev.ppl_tokens), model=item.model, pack_to=max(ev.ppl_lengths))
  ppl["train_length"] = run.train_length
  storage.write_text(os.path.join(where, "ppl.json"), json.dumps(ppl, indent=1))
  results = {"ppl": "ppl.json"}
  for task in ev.tasks:
    need = retrieval.min_length(run.tokenizer, task, haystack)
    lengths = [int(n) for n in ev.retrieval_lengths if int(n) > need]
    if not lengths:  # the report shows the task as not measured for this model
      continue
    depths = [float(d) for d in ev.depths]
    res = retrieval.retrieval_grid(
        generate, model, run.variables, run.tokenizer, task, lengths, depths,
        samples=int(ev.samples), haystack=haystack, seed=0, model_name=item.model,
        batch_size=len(lengths) * len(depths) * int(ev.samples), mix_lengths=True,
        echo=lambda _: None)
    res["train_length"] = run.train_length
    storage.write_text(os.path.join(where, f"{task}.json"), json.dumps(res, indent=1))
    plots.retrieval_heatmap(res, os.path.join(where, f"{task}.png"), run.train_length)
    results[task] = f"{task}.json"
  return results


def run_item(workdir: str, name: str) -> dict:
  study = read_study(workdir)
  items = plan_lib.by_name(plan_lib.build(study))
  if name not in items:
    raise ValueError(f"--name={name!r} is not an item of the study in {workdir}; "
                     f"items: {sorted(items)}")
  item = items[name]
  start, cpu = time.perf_counter(), time.process_time()
  result = (run_train if item.kind == "train" else run_eval)(study, item, workdir)
  record = {"item": name, "wall_sec": time.perf_counter() - start,
            "cpu_sec": time.process_time() - cpu,  # all threads of this process
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
  storage.write_text(os.path.join(out_dir(workdir, item), DONE), json.dumps(record, indent=1))
  return record


def main(argv) -> None:
  del argv
  from absl import flags  # noqa: PLC0415
  run_item(flags.FLAGS.workdir, flags.FLAGS.name)


if __name__ == "__main__":
  from absl import flags

  from ctxjax import cli
  flags.DEFINE_string("workdir", None, "The study's directory.")
  flags.DEFINE_string("name", None, "The item, e.g. train:extend_pi.")
  flags.mark_flags_as_required(["workdir", "name"])
  cli.run("ctxjax.study.item", main)
