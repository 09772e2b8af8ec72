"""What goes wrong with checkpoints, each reported in one line (ctxjax/train/checkpoint.py uses
these): an unwritable directory (checked before step 1), a save failing in orbax's background
threads (surfaced at the next step; orbax's waiting threads released so the process exits in
seconds, not after its 300 s coordination timeout), and a damaged checkpoint (a truncated,
missing or zero-filled file), found by restoring it, the only check that reads every byte.
`newest_restorable` then tries older checkpoints, lazily: a huge run's older checkpoints are
read only when every newer one failed.
"""
from __future__ import annotations

import contextlib
import gc
import logging as std_logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

from absl import logging
from etils import epath

_REASON_CHARS = 300  # a reason longer than this is cut: it is one line in a log


class ModelMismatch(ValueError):
  """A checkpoint of another model: not damage, so never a reason to fall back."""


def _innermost(err: BaseException) -> BaseException:
  while err.__cause__ is not None:
    err = err.__cause__
  return err


def failure_reason(err: BaseException) -> str:
  """One line for a failed orbax read or write: the innermost cause's first line (orbax wraps
  the tensorstore error, whose own text is a page of JSON spec, around the line that says what
  is wrong, e.g. 'OUT_OF_RANGE: ... byte range [0, 2240) is not valid for value of size 1254')."""
  err = _innermost(err)
  lines = str(err).strip().splitlines()
  return f"{type(err).__name__}: {lines[0] if lines else ''}"[:_REASON_CHARS]


@contextlib.contextmanager
def _quiet_orbax():
  """orbax (through absl's python logger) logs each failed read at ERROR with its traceback,
  and its abandoned read coroutines print theirs when collected: hundreds of lines for one
  damaged file. While checkpoints are tried, the caller reports the reason once, in one line
  (call gc.collect() inside, after a failure, so the coroutines are finalized here)."""
  logger = std_logging.getLogger("absl")
  level, hook = logger.level, sys.unraisablehook
  logger.setLevel(std_logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    gc.collect()
    logger.setLevel(level)
    sys.unraisablehook = hook


class OrbaxErrorsOneLine(std_logging.Filter):
  """orbax logs a failed background save with its traceback, from several threads; the
  Checkpointer raises the reason itself in one line, so orbax's ERROR records keep their first
  line only while a Checkpointer is open."""

  def __init__(self):
    super().__init__()
    self.reported = False  # the Checkpointer raised the failure: orbax's aftermath is dropped

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.ERROR and "orbax" in record.pathname:
      if self.reported:
        return False
      record.msg, record.args = record.getMessage().strip().split("\n", 1)[0], ()
      record.exc_info, record.exc_text = None, None
    return True


class OrbaxTasksOneLine(std_logging.Filter):
  """A damaged checkpoint's failed read leaves orbax asyncio tasks whose exception nobody
  retrieves; asyncio logs each ("Task exception was never retrieved") with its traceback when
  the task is garbage-collected, at any later moment of the run. The damage is already reported
  in one line, so such a record keeps one line: its first and the exception's."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    tb = record.exc_info[2] if record.exc_info else None
    if (record.levelno >= std_logging.ERROR and tb is not None
        and any("orbax" in frame.filename for frame in traceback.extract_tb(tb))):
      first = record.getMessage().strip().split("\n", 1)[0]
      reason = str(exc).strip().split("\n", 1)[0][:300]
      record.msg, record.args = f"{first}: {type(exc).__name__}: {reason}", ()
      record.exc_info, record.exc_text = None, None
    return True


_TASKS_ONE_LINE = OrbaxTasksOneLine()


def quiet_orbax_tasks() -> None:
  """Installs `OrbaxTasksOneLine` on asyncio's logger, once, for the rest of the process (the
  tasks may be collected after the Checkpointer closed)."""
  logger = std_logging.getLogger("asyncio")
  if _TASKS_ONE_LINE not in logger.filters:
    logger.addFilter(_TASKS_ONE_LINE)


def release_orbax_waiters() -> None:
  """orbax 0.12's save threads wait for a 'directory created' signal that a save whose
  directory could not be created never sends: up to the 300 s coordination timeout, and the
  interpreter waits for them at exit. Sending it lets them run, fail at once and end. (orbax
  internals: where they moved, the old wait remains, nothing worse.)"""
  try:
    from orbax.checkpoint._src.futures import future, synchronization  # noqa: PLC0415
    signals = [synchronization.HandlerAwaitableSignal.STEP_DIRECTORY_CREATION,
               synchronization.HandlerAwaitableSignal.ITEM_DIRECTORY_CREATION]
    current = int(synchronization.OperationIdGenerator.get_current_operation_id())
    for op in range(current + 1):
      future.set_signals(signals, operation_id=str(op))
  except (ImportError, AttributeError, TypeError, ValueError) as err:
    logging.warning("could not release orbax's waiting save threads (%s)", err)


def drain(seconds: float = 10.0) -> None:
  """Lets a failed save's orbax threads end (released: they fail at once) before the error
  propagates and the interpreter exits under them; bounded, so a stuck thread cannot hang."""
  deadline = time.monotonic() + seconds
  for thread in threading.enumerate():
    if type(thread).__module__.startswith("orbax") and thread is not threading.current_thread():
      try:
        thread.join(max(0.0, deadline - time.monotonic()))
      except Exception:  # noqa: BLE001 (orbax's join re-raises the thread's error: reported)
        pass


def newest_restorable(steps, read: Callable[[int], Any], directory: str):
  """(read(step), step, [(damaged step, reason), ...]) for the newest of `steps` that `read`
  restores, trying older steps only when newer ones fail; ModelMismatch propagates at once.
  None restoring: ValueError with their reasons (nothing is called damaged then)."""
  skipped = []
  with _quiet_orbax():
    for step in sorted(steps, reverse=True):
      try:
        return read(step), step, skipped
      except ModelMismatch:
        raise
      except Exception as err:  # noqa: BLE001 (any failure to read is the reason to fall back)
        skipped.append((step, failure_reason(err)))
      gc.collect()  # the failed read's coroutines, now unreferenced, finalize quietly
  tried = "; ".join(f"step {s}: {r}" for s, r in skipped)
  raise ValueError(f"no checkpoint under {directory} restores ({tried}); if they are damaged "
                   f"move them aside (e.g. mv {directory}/{skipped[0][0]} "
                   f"{directory}/{skipped[0][0]}.corrupt), or use another --workdir")


def read_step(read: Callable[[int], Any], step: int, directory: str, flag: str):
  """read(step) of an explicitly chosen step: no fallback; a damaged one fails in one line."""
  with _quiet_orbax():
    try:
      return read(step)
    except ModelMismatch:
      raise
    except Exception as err:  # noqa: BLE001
      reason = failure_reason(err)
    gc.collect()
  raise ValueError(f"{flag}={step}: checkpoint {directory}/{step} does not restore ({reason})")


def save_error(directory: str, err: BaseException) -> OSError:
  """A failed save as one line: PermissionError where the directory cannot be written (the
  command boundary prints it without a traceback), OSError otherwise (e.g. a full disk). The
  complete checkpoints are listed from disk (orbax counts the failed step as saved)."""
  unwritable = isinstance(_innermost(err), (PermissionError, NotADirectoryError,
                                            FileExistsError))
  try:
    steps = sorted(int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit())
  except OSError:
    steps = "none: it cannot be listed"
  return (PermissionError if unwritable else OSError)(
      f"saving a checkpoint to {directory} failed ({failure_reason(err)}); complete "
      f"checkpoints there: {steps}")


def check_writable(directory: str) -> None:
  """Creates `directory` and writes (then removes) a probe file: an unwritable checkpoint
  directory fails before step 1, in one line, instead of in orbax's background save."""
  path = epath.Path(directory)
  probe = path / f".write-probe-{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as err:
    raise PermissionError(f"checkpoint directory {directory} is not writable "
                          f"({failure_reason(err)}); fix its permissions or use another "
                          f"--workdir (config.train.save_every=0 saves none)") from None
