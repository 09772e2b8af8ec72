"""The one command-line error boundary of ctxjax's commands (train, evaluate, import_hf,
export_hf, aot, and whatever comes next): a user error exits 2 with one line on stderr,
`<command>: <message naming the key/flag/path and the fix>`, and no traceback.

  if __name__ == "__main__":
    cli.run("ctxjax.evaluate", main)      # instead of absl's app.run(main)

What counts as a user error (decided here, once):
  * `UserError` (a ValueError), absl's UsageError and flag errors, and the file-system errors a
    path argument causes: FileNotFoundError, NotADirectoryError, IsADirectoryError,
    PermissionError, FileExistsError; a malformed JSON or safetensors file (named by the file
    being read);
  * a plain ValueError only when ctxjax's own code raised it (the innermost frame of its
    traceback is a `raise` statement in ctxjax/): library validation raises plain ValueError
    with a one-line message (config sections, registries, loaders) and needs no import of this
    module. A ValueError raised inside jax, numpy, orbax, ... is a bug or an input we failed
    to validate, and keeps its traceback: a blanket `except ValueError` would hide exactly
    those. `UserError` is for messages raised outside ctxjax's raise statements (flag parsing).
  Anything else propagates with its traceback (exit 1). CTXJAX_TRACEBACK=1 or absl's
  `--verbosity=1` prints the traceback of a user error too, then the same line and exit 2.
"""
from __future__ import annotations

import contextlib
import io
import json
import linecache
import os
import re
import sys
import traceback

from absl import app, flags

TRACEBACK_ENV = "CTXJAX_TRACEBACK"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                  FileExistsError)
_OS_HINTS = {FileNotFoundError: "check the path", NotADirectoryError: "give a directory",
             IsADirectoryError: "give a file", PermissionError: "fix its permissions or "
             "choose another path", FileExistsError: "remove it or choose another path"}


class UserError(ValueError):
  """A mistake in a command line, config or input path; its message is the one line shown."""


def _raised_by_ctxjax(err: BaseException) -> bool:
  """Whether ctxjax's own code raised `err`: the innermost frame of its traceback is a `raise`
  statement in ctxjax/. (A ValueError raised by a C function, such as numpy's reshape, has the
  ctxjax line that called it as its innermost frame: a call, not a `raise`.)"""
  tb = err.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  if tb is None or not tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR):
    return False
  line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
  return line.startswith("raise ")


# A malformed .safetensors file (its own exception type; matched by name: the library is the
# optional `hf` extra).
_MALFORMED_FILES = ("SafetensorError",)


def is_user_error(err: BaseException) -> bool:
  if isinstance(err, (UserError, app.UsageError, flags.Error, json.JSONDecodeError)
                + USER_OS_ERRORS) or type(err).__name__ in _MALFORMED_FILES:
    return True
  return isinstance(err, ValueError) and _raised_by_ctxjax(err)


def _file_in_traceback(err: BaseException, is_file) -> str | None:
  """The innermost frame local of `err`'s traceback that `is_file` accepts, as a string: the
  file a parser was reading when it failed (their errors do not name it)."""
  name, tb = None, err.__traceback__
  while tb is not None:
    for value in tb.tb_frame.f_locals.values():
      if is_file(value):
        name = str(getattr(value, "name", value)) if isinstance(value, io.IOBase) else str(value)
    tb = tb.tb_next
  return name


def one_line(err: BaseException) -> str:
  """The user-facing message of `err` on one line."""
  if isinstance(err, json.JSONDecodeError):
    source = _file_in_traceback(err, lambda v: isinstance(v, io.IOBase) and isinstance(
        getattr(v, "name", None), str)) or "a JSON file"
    message = (f"{source} is not valid JSON ({err.msg}: line {err.lineno} column {err.colno});"
               f" fix or regenerate it")
  elif type(err).__name__ == "SafetensorError":
    source = _file_in_traceback(err, lambda v: isinstance(v, (str, os.PathLike)) and str(
        v).endswith(".safetensors")) or "a .safetensors file"
    message = f"{source} is not a readable safetensors file ({err}); re-download or re-export it"
  elif isinstance(err, OSError) and err.strerror and err.filename is not None:
    message = f"{err.filename}: {err.strerror}"  # errno-style: "[Errno 2] ... 'x'" reworded
    hint = next((h for t, h in _OS_HINTS.items() if isinstance(err, t)), None)
    message += f"; {hint}" if hint else ""
  else:
    message = str(err) or type(err).__name__
  return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _verbosity(argv) -> int:
  """absl's --verbosity/-v as given on the command line (flags may not be parsed yet)."""
  for i, arg in enumerate(argv):
    m = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", arg)
    if m:
      value = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv)
                                                         else "")
      return int(value) if re.fullmatch(r"-?\d+", value) else 0
  return 0


def show_traceback() -> bool:
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or _verbosity(sys.argv) >= 1


@contextlib.contextmanager
def boundary(command: str):
  """Turns a user error raised inside into `command: message` on stderr and exit 2."""
  try:
    yield
  except Exception as err:  # noqa: BLE001  (re-raised unless it is a user error)
    if not is_user_error(err):
      raise
    if show_traceback():
      traceback.print_exc()
    print(f"{command}: {one_line(err)}", file=sys.stderr, flush=True)
    sys.exit(2)


def run(command: str, main) -> None:
  """absl's app.run(main), with flag parsing (`parse_flags`) and `main` inside
  `boundary(command)`."""

  def parse_inside(argv):
    with boundary(command):
      return parse_flags(argv)

  def main_inside(argv):
    with boundary(command):
      return main(argv)

  app.run(main_inside, flags_parser=parse_inside)


@contextlib.contextmanager
def flag_names(**flag_for_keyword):
  """Re-raises a ValueError/OSError whose message names a Python keyword with the command's
  flag instead: with flag_names(overwrite="--overwrite"), "pass overwrite=True" becomes
  "pass --overwrite" (library hints name keywords; the user typed flags)."""
  try:
    yield
  except (ValueError, OSError) as err:
    message = str(err)
    for keyword, flag in flag_for_keyword.items():
      message = re.sub(rf"(?<![-\w.]){keyword}=True\b", flag, message)
      message = re.sub(rf"(?<![-\w.]){keyword}=", f"{flag}=", message)
    if message == str(err):
      raise
    raise (type(err) if isinstance(err, OSError) else UserError)(message) from err


def output_dir(path: str, flag: str) -> str:
  """`path`, checked as a directory this process can create or write into: its nearest
  existing ancestor is a writable directory. Non-local paths (gs://...) are left to the
  storage layer."""
  if "://" in path:
    return path
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f"{flag}={path}: {existing} is a file, not a directory; give a "
                             f"directory path")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"{flag}={path}: {existing} is not writable by this user; fix its "
                          f"permissions or choose another directory")
  return path


def input_dir(path: str, flag: str, what: str) -> str:
  """`path`, checked as an existing, readable local directory (`what` it should hold names
  the fix); non-local paths are left to the storage layer."""
  if "://" in path:
    return path
  if not os.path.exists(path):
    raise FileNotFoundError(f"{flag}={path}: no such directory; give {what}")
  if not os.path.isdir(path):
    raise NotADirectoryError(f"{flag}={path} is a file; give {what}")
  if not os.access(path, os.R_OK | os.X_OK):
    raise PermissionError(f"{flag}={path} is not readable by this user; fix its permissions")
  return path


# --- --config=FILE and --config.a.b=VALUE (ml_collections' config_flags)


def _config_spec(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config_file(spec: str):
  """The ConfigDict of `--config=spec` (PATH[:ARG]); a missing, unreadable or broken recipe
  raises one line (ml_collections defers or wraps these errors in tracebacks)."""
  from ml_collections.config_flags import config_flags  # noqa: PLC0415
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    is_dir = os.path.isdir(path)
    raise (IsADirectoryError if is_dir else FileNotFoundError)(
        f"--config={spec}: {path} is {'a directory' if is_dir else 'not a file'}; give a recipe "
        f"file such as configs/tiny.py")
  if not os.access(path, os.R_OK):
    raise PermissionError(f"--config={spec}: {path} is not readable by this user; fix its "
                          f"permissions")
  try:
    config = config_flags.ConfigFileFlagParser(name="config").parse(spec)
  except SyntaxError as err:
    raise UserError(f"--config={spec}: {err.msg} at {err.filename}:{err.lineno}; fix the "
                    f"recipe") from err
  except Exception as err:  # noqa: BLE001  (any failure of the recipe's own code)
    last = [l for l in str(err).splitlines() if l.strip()][-1:] or [type(err).__name__]
    if isinstance(err, AttributeError) and "get_config" in str(err):
      last = [f"{path} defines no get_config()"]
    raise UserError(f"--config={spec}: the recipe failed to load: {last[0].strip()}") from err
  if hasattr(config, "_error"):  # ml_collections' deferred IOError
    raise UserError(f"--config={spec}: {one_line(config._error)}")  # noqa: SLF001
  return config


def _unknown_override(config, argv) -> str | None:
  """The first `--config.a.b=...` whose path `config` lacks, as unknown_key's message."""
  from ctxjax.data.settings import unknown_key  # noqa: PLC0415
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    parts, node = arg[len("--config."):].split("=", 1)[0].split("."), config
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        return unknown_key(".".join(parts[:i]), part, node.keys() if hasattr(node, "keys") else ())
      node = node[part]
  return None


def _recipe_flag_defined() -> bool:
  """Whether --config is an ml_collections recipe flag (ctxjax.study's --config is a plain
  string naming a study config, loaded by the command itself)."""
  if "config" not in flags.FLAGS:
    return False
  from ml_collections.config_flags import config_flags  # noqa: PLC0415
  return isinstance(flags.FLAGS["config"].parser, config_flags.ConfigFileFlagParser)


def parse_flags(argv):
  """absl `flags_parser` of every command: a bad flag raises one line (UserError) for
  `boundary`; with a `--config` flag defined, the recipe file is checked first and a bad
  `--config.KEY=VALUE` override names its full key and the closest valid ones (ml_collections
  raises a bare AttributeError / KeyError / TypeError from inside flag parsing)."""
  spec = _config_spec(argv) if _recipe_flag_defined() else None
  config = load_config_file(spec) if spec else None
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
    unknown = _unknown_override(config, argv) if config is not None else None
    if unknown:
      raise UserError(f"bad --config override: {unknown}") from None
    raise UserError(str(err) if isinstance(err, flags.Error) else
                    f"bad --config override: {err}") from None
