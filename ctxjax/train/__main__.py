"""`python -m ctxjax.train --config=configs/tiny.py --workdir=DIR [--config.a.b=value ...]`"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/<recipe>.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from ctxjax.train.trainer import train
  logging.set_verbosity(logging.INFO)
  summary = train(_CONFIG.value, _WORKDIR.value)
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in summary.items()))


if __name__ == "__main__":
  app.run(main)
