"""Workdir paths that may be local or in object storage (`gs://bucket/run`, `s3://...`: any
path `etils.epath` understands), so every file a run writes or reads goes through one place.

Local paths keep the behaviour of plain `os`/`open` (absolute paths, appends, renames); remote
ones go through `etils.epath` (gcsfs for gs:// without TensorFlow). Orbax checkpoints take the
path as given (orbax writes arrays through tensorstore, which talks to GCS itself). Objects
cannot be appended to or renamed cheaply, so files that grow (metrics.jsonl, TensorBoard
events) are written in a local staging directory and mirrored by `Mirror`.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import time

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(path) -> bool:
  """True for a path of this machine's filesystem (no `scheme://` prefix)."""
  return not _SCHEME.match(os.fspath(path))


def _epath(path):
  from etils import epath  # noqa: PLC0415  (lazy: local runs never import the gcs stack)
  return epath.Path(path)


def resolve(path) -> str:
  """Absolute local path, or the remote path as given (`os.path.abspath('gs://b/r')` would give
  '/cwd/gs:/b/r')."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else str(_epath(path))


def join(base, *names) -> str:
  base = os.fspath(base)
  return os.path.join(base, *names) if is_local(base) else str(_epath(base).joinpath(*names))


def basename(path) -> str:
  """The last component ('run' for 'gs://bucket/run/' as for 'runs/run/')."""
  path = os.fspath(path)
  return os.path.basename(os.path.normpath(path)) if is_local(path) else _epath(path).name


def exists(path) -> bool:
  return os.path.exists(path) if is_local(path) else _epath(path).exists()


def isdir(path) -> bool:
  return os.path.isdir(path) if is_local(path) else _epath(path).is_dir()


def isfile(path) -> bool:
  return os.path.isfile(path) if is_local(path) else _epath(path).is_file()


def listdir(path) -> list[str]:
  """Sorted entry names of a directory."""
  if is_local(path):
    return sorted(os.listdir(path))
  return sorted(p.name for p in _epath(path).iterdir())


def makedirs(path) -> None:
  if is_local(path):
    os.makedirs(path, exist_ok=True)
  else:
    _epath(path).mkdir(parents=True, exist_ok=True)


def rmtree(path) -> None:
  """Deletes a directory and everything under it."""
  if is_local(path):
    shutil.rmtree(path)
  else:
    _epath(path).rmtree()


def open_file(path, mode: str = "r"):
  """`open(path, mode)` for a local or remote path (text modes in UTF-8). A remote file opened
  for writing is one object written at close: no appends ("a"), see `Mirror`."""
  encoding = None if "b" in mode else "utf-8"
  if is_local(path):
    return open(path, mode, encoding=encoding)
  return _epath(path).open(mode, encoding=encoding)


def read_text(path) -> str:
  with open_file(path) as f:
    return f.read()


def read_json(path):
  """The JSON document at `path`; a malformed one is a ValueError that names the file."""
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as err:
    raise ValueError(f"{path} is not valid JSON ({err.msg}: line {err.lineno} column "
                     f"{err.colno}); fix or regenerate it") from None


def write_text(path, text: str) -> None:
  with open_file(path, "w") as f:
    f.write(text)


def copy_file(src, dst) -> None:
  """Copies one file between any two locations (local <-> remote), streaming."""
  with open_file(src, "rb") as fi, open_file(dst, "wb") as fo:
    shutil.copyfileobj(fi, fo, 16 << 20)


def copy_tree(src, dst) -> None:
  """Copies directory `src` (recursively) into `dst`, creating it."""
  makedirs(dst)
  for name in listdir(src):
    s, d = join(src, name), join(dst, name)
    if isdir(s):
      copy_tree(s, d)
    else:
      copy_file(s, d)


def save_figure(fig, path, **kwargs) -> None:
  """`fig.savefig(path)`, also to a remote path (rendered in memory, then written once)."""
  if is_local(path):
    fig.savefig(path, **kwargs)
    return
  buf = io.BytesIO()
  fig.savefig(buf, format=os.path.splitext(os.fspath(path))[1][1:] or None, **kwargs)
  with open_file(path, "wb") as f:
    f.write(buf.getvalue())


class Mirror:
  """Keeps remote directory `remote` a copy of local directory `local`: `sync()` uploads the
  files that changed since the last upload, at most every `every_sec` seconds unless
  `force`d (the first call always uploads). A process killed between syncs loses at most
  `every_sec` of what it wrote to `local`."""

  def __init__(self, local: str, remote: str, every_sec: float):
    self.local, self.remote, self.every_sec = local, remote, float(every_sec)
    self._uploaded: dict[str, tuple[int, int]] = {}
    self._last = None

  def sync(self, force: bool = False) -> None:
    now = time.monotonic()
    if not force and self._last is not None and now - self._last < self.every_sec:
      return
    self._last = now
    for root, _, files in os.walk(self.local):
      for name in files:
        path = os.path.join(root, name)
        st = os.stat(path)
        if self._uploaded.get(path) != (st.st_size, st.st_mtime_ns):
          rel = os.path.relpath(path, self.local).split(os.sep)
          copy_file(path, join(self.remote, *rel))
          self._uploaded[path] = (st.st_size, st.st_mtime_ns)
