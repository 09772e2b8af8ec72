"""Where a training run's log lines go. Orbax logs ~45 INFO lines per checkpoint save, which
buried ctxjax's own lines and broke the progress bar; so every record at INFO and above goes
to a log file, WORKDIR/logs/<command>.<host>.<pid>.log (one per process: multi-host runs
share the workdir), and the terminal (absl's stderr handler) keeps ctxjax's own INFO lines and
anyone's WARNING and above. `--verbosity=1` (absl's debug level) shows everything on the
terminal as before. A workdir that is not a local path (gs://...) logs under a local temp
directory instead, named on the terminal's first line.
"""
from __future__ import annotations

import logging as py_logging
import os
import socket
import sys
import tempfile

from absl import logging

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def log_path(workdir: str, command: str) -> str:
  """The log file of this process: under WORKDIR/logs, or a local temp dir for gs://..."""
  name = f"{command}.{socket.gethostname()}.{os.getpid()}.log"
  if "://" in workdir:
    return os.path.join(tempfile.mkdtemp(prefix=f"ctxjax-{command}-logs-"), name)
  return os.path.join(os.path.abspath(workdir), "logs", name)


class _Terminal(py_logging.Filter):
  """What the terminal shows: ctxjax's own lines and anyone's warnings and errors; before the
  first line it hides, one line naming the log file that holds it."""

  def __init__(self, path: str, announced: bool):
    super().__init__()
    self.path, self.announced = path, announced

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING or record.pathname.startswith(PACKAGE_DIR):
      return True
    if not self.announced:
      self.announced = True
      print(announcement(self.path), file=sys.stderr, flush=True)
    return False


def announcement(path: str) -> str:
  return f"library INFO lines go to {path}"


def setup(workdir: str, command: str = "train") -> str:
  """Routes this process's log records as the module says; returns the log file's path. A
  local log file is named when the terminal first hides a line (a run stopped by a user error
  before that prints only its error); a temp one for gs://... is named at once."""
  path = log_path(workdir, command)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if logging.get_verbosity() < logging.INFO:
    logging.set_verbosity(logging.INFO)
  handler = py_logging.FileHandler(path, encoding="utf-8")
  handler.setFormatter(logging.PythonFormatter())
  py_logging.getLogger().addHandler(handler)
  local = "://" not in workdir
  if not local:
    print(announcement(path), file=sys.stderr, flush=True)
  if logging.get_verbosity() < logging.DEBUG:
    logging.get_absl_handler().addFilter(_Terminal(path, announced=not local))
  return path
