"""Atomic files for the agent's stores: a JSONL of records and a .npy of their vectors.

Every write goes to a temporary file in the same directory and is renamed over the target
(`os.replace`, atomic on POSIX): a session killed mid-save leaves the previous complete file,
never a torn one, so a restarted session sees the stores of its last completed save. Local
paths only (object stores have no atomic rename).
"""
from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np


def atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` all at once (temp file + fsync + rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_jsonl(path: str, records) -> None:
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  atomic_write(path, text.encode("utf-8"))


def read_jsonl(path: str) -> list:
  """The records of `path` ([] when it does not exist); a bad line names the file and line."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as err:
          raise ValueError(f"{path}:{i} is not valid JSON ({err.msg}); the store is corrupt: "
                           f"restore it or delete the workdir") from None
  return out


def write_json(path: str, obj) -> None:
  atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8"))


def read_json(path: str, default=None):
  if not os.path.exists(path):
    return default
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as err:
      raise ValueError(f"{path} is not valid JSON ({err.msg}); restore it or delete the "
                       f"workdir") from None


def write_npy(path: str, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  atomic_write(path, buf.getvalue())


def read_npy(path: str) -> np.ndarray | None:
  return np.load(path, allow_pickle=False) if os.path.exists(path) else None
