"""`python -m ctxjax.study --workdir=DIR [--preset=quick|full|smoke] [--config=FILE[:ARG]]`

Runs the context-extension study of configs/study.py (its header says what it trains and
evaluates) and writes DIR/report/README.md with tables, plots and the published findings
checked against the numbers. A killed study resumes: run the same command again (finished
items are kept, a half-trained run continues from its checkpoint). `--report_only` rewrites
the report from what is finished.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from absl import flags

def define_flags() -> None:
  """The command's flags (defined on demand: importing this module defines none)."""
  flags.DEFINE_string("workdir", "runs/study", "The study's directory.")
  flags.DEFINE_string("preset", "quick", "quick | full | smoke (configs/study.py).")
  flags.DEFINE_string("config", None, "A study config file (default: configs/study.py of "
                      "this checkout), optionally FILE:ARG (ARG replaces --preset).")
  flags.DEFINE_integer("parallel", None, "Worker processes at once (default: the config's "
                       "`parallel`).")
  flags.DEFINE_bool("report_only", False, "Only rewrite the report.")
  flags.DEFINE_bool("aot", False, "Only compile every distinct training item for the "
                    "config's aot.topology on this host (python -m ctxjax.aot) and say "
                    "whether each fits; trains nothing.")


def default_config_path() -> str:
  import ctxjax  # noqa: PLC0415
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ctxjax.__file__))),
                      "configs", "study.py")


def load_study_config(path: str, arg: str):
  """configs/<study>.py's get_config(arg); its directory's parent goes on sys.path (configs
  import each other as `configs.<name>`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={path}: no such file; give a study config such as "
                            "configs/study.py")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location("ctxjax_study_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _pin_study(workdir: str, study) -> None:
  """Writes DIR/study.json, or checks a resumed study's is the same plan."""
  path = os.path.join(workdir, "study.json")
  text = study.to_json(indent=1, sort_keys=True)
  if os.path.isfile(path):
    with open(path) as f:
      if json.load(f) != json.loads(text):
        raise ValueError(f"--workdir={workdir} holds a study with another config ({path}); "
                         "resume it with the same --preset/--config, or give a new --workdir")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _prepare_data(study) -> None:
  """The demo corpus, tokenizer and token cache, built once before workers share them."""
  from ctxjax.data import corpus, demo, tokenizer  # noqa: PLC0415
  data = study.base.data
  if any(data.get(k) for k in ("jsonl", "tfds_name", "tokenizer")):
    return  # a corpus of the user's: nothing to build
  root = data.data_dir or None
  jsonl = corpus.ensure_demo_corpus(root)
  tok = tokenizer.ensure_demo_tokenizer(corpus.default_data_dir() if root is None else root,
                                        study.base.model.vocab_size)
  demo.load_or_tokenize(jsonl, tok)


def _record_session(workdir: str, seconds: float, parallel: int) -> None:
  """Appends this invocation's wall time to DIR/sessions.jsonl (a resumed study has several)."""
  with open(os.path.join(workdir, "sessions.jsonl"), "a") as f:
    f.write(json.dumps({"ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "wall_sec": round(seconds, 1), "parallel": parallel}) + "\n")


def _aot_check(study, items, workdir: str) -> int:
  """Compiles each distinct training item (items differing only in data or optimizer values
  compile the same program) for study.aot.topology (or study.aot.devices, "cpu:N" fake CPU
  devices); 1 if one does not fit."""
  import jax  # noqa: PLC0415
  from ctxjax import aot  # noqa: PLC0415
  target = study.get("aot") or {}
  topology, devices = target.get("topology"), target.get("devices")
  if not (topology or devices):
    raise ValueError("--aot: the study config has no aot.topology (a TPU product name such as "
                     "v5p-128) or aot.devices ('cpu:N'); set one, as configs/study_llama2_7b.py")
  jax.config.update("jax_platforms", "cpu")
  if devices:
    jax.config.update("jax_num_cpu_devices", aot.parse_devices(devices))
  from ctxjax.study import item as item_lib  # noqa: PLC0415
  seen, reports = {}, []
  for it in items:
    if it.kind != "train":
      continue
    cfg = item_lib.train_config(study, it, workdir)
    key = json.dumps([cfg.model.to_dict(), cfg.mesh.to_dict(), cfg.data.seq_len,
                      cfg.data.batch_size, cfg.train.grad_accum_steps,
                      list(cfg.optim.get("trainable") or [])], sort_keys=True, default=str)
    if key in seen:
      print(f"{it.model}: the same program as {seen[key]}")
      continue
    seen[key] = it.model
    reports += aot.run(cfg, name=it.model, topology=topology, devices=devices,
                       stage=None, mfu=0.4, emit=lambda r: print(aot.format_report(r),
                                                                flush=True))
  code, messages = aot.verdict(reports)
  for message in messages:
    print(message, file=sys.stderr)
  return code


def main(argv) -> None:
  del argv
  from ctxjax import cli  # noqa: PLC0415
  from ctxjax.study import plan, report, scheduler  # noqa: PLC0415
  f = flags.FLAGS
  workdir = os.path.abspath(cli.output_dir(f.workdir, "--workdir"))
  path, _, arg = (f.config or default_config_path()).partition(":")
  pinned = os.path.join(workdir, "study.json")
  if f.report_only and os.path.isfile(pinned):  # the study as it was run
    from ctxjax.study import item  # noqa: PLC0415
    study = item.read_study(workdir)
  else:
    study = load_study_config(path, arg or f.preset)
  items = plan.build(study)
  if f.aot:
    sys.exit(_aot_check(study, items, workdir))
  if not f.report_only:
    _pin_study(workdir, study)
    _prepare_data(study)
    parallel = int(study.parallel) if f.parallel is None else f.parallel
    total = sum(it.cost for it in items)
    from tqdm import tqdm  # noqa: PLC0415
    bar = tqdm(total=total, desc="study", unit="", bar_format="{l_bar}{bar}| {elapsed}<"
               "{remaining}", disable=not sys.stderr.isatty())
    count = [0]
    start = time.perf_counter()

    def finished(it, wall, skipped):
      count[0] += 1
      bar.update(it.cost)
      state = "already done" if skipped else f"{wall:.0f} s"
      bar.write(f"[{count[0]}/{len(items)}] {it.name}: {state} "
                f"({time.perf_counter() - start:.0f} s into the study)")

    failure = None
    try:
      scheduler.run_items(workdir, items, parallel=parallel, on_finish=finished)
    except scheduler.ItemFailed as e:
      failure = e
    finally:
      bar.close()
      _record_session(workdir, time.perf_counter() - start, parallel)
    if failure is not None:
      out = report.write_report(workdir, study, items)  # what did finish
      raise cli.UserError(f"{failure}; partial report: {out}")
  out = report.write_report(workdir, study, items)
  print(f"report: {out}")


if __name__ == "__main__":
  from ctxjax import cli
  define_flags()
  cli.run("ctxjax.study", main)
