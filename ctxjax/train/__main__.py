"""`python -m ctxjax.train --config=configs/tiny.py --workdir=DIR [--config.a.b=value ...]`

Multi-host: run the same command on every host; add `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` where JAX cannot detect the cluster (ctxjax/train/distributed.py).
A bad flag, config key/value, recipe or workdir: one line and exit 2 (ctxjax/cli.py). Library INFO
lines go to WORKDIR/logs/ (ctxjax/train/logs.py); the terminal keeps ctxjax's own.
"""
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/<recipe>.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and checkpoints.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: HOST:PORT of process 0 (env CTXJAX_COORDINATOR).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-host: process count (env CTXJAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-host: this process's id (env CTXJAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from ctxjax import cli
  from ctxjax.train.config import run_config
  cfg = run_config(_CONFIG.value)  # a bad key or value: one line (ctxjax/cli.py), before JAX
  cli.output_dir(_WORKDIR.value, "--workdir")
  for key, what in (("init_from", "a ctxjax workdir"), ("init_from_hf", "a Hugging Face model "
                                                        "directory")):
    if getattr(cfg.train, key):
      cli.input_dir(getattr(cfg.train, key), f"config.train.{key}", what)
  from ctxjax.train import distributed, logs
  logs.setup(_WORKDIR.value, "train")  # library INFO to WORKDIR/logs/, ctxjax's to stderr
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from ctxjax.eval.during_training import make_evaluator  # the command composes train + eval
  from ctxjax.train.trainer import train
  summary = train(_CONFIG.value, _WORKDIR.value, make_evaluator=make_evaluator)
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in summary.items() if k != "eval"))


if __name__ == "__main__":
  from ctxjax import cli
  cli.run("ctxjax.train", main)
