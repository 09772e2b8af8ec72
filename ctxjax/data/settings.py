"""Typed, frozen config sections read ONCE from an ml_collections ConfigDict (big_vision /
nanodo style): the parser every section uses (DataConfig in ctxjax/data/config.py, the
trainer's sections in ctxjax/train/config.py).

Each field's default is written once, in the dataclass (`setting(...)`); a field without one is
required. `from_mapping(cls, mapping, path)` rejects unknown keys naming the full path and the
closest valid keys (`unknown config key data.seq_le; did you mean 'data.seq_len'? valid keys:
[...]`), checks every value's type and range with one line naming the key
(`data.seq_len must be a positive integer, got -3`) and returns the frozen object.

This module imports nothing from ctxjax but the registry helper: every layer may use it.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping

from ctxjax.registry import unknown_choice


# -- one value ---------------------------------------------------------------------

def positive(path: str, value) -> None:
  if value < 1:
    raise ValueError(f"{path} must be a positive integer, got {value!r}")


def nonnegative(path: str, value) -> None:
  if value < 0:
    raise ValueError(f"{path} must be a non-negative integer, got {value!r}")


def choice(*choices: str) -> Callable[[str, Any], None]:
  def check(path, value):
    if value not in choices:
      raise ValueError(unknown_choice(path, value, choices))
  return check


_WHAT = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
         tuple: "a list", dict: "a dict"}


def setting(default: Any = dataclasses.MISSING, *, kind: type | None, optional: bool = False,
            check: Callable[[str, Any], None] | None = None):
  """A config field: `kind` is the value's type (None: any; the owning module validates it),
  `optional` allows None, `check(path, value)` raises on a bad value."""
  meta = {"kind": kind, "optional": optional, "check": check}
  if isinstance(default, (list, dict)):
    raise TypeError("mutable defaults: use a tuple or None")
  return dataclasses.field(default=default, metadata=meta)


def _convert(path: str, value, kind, optional: bool):
  """`value` as `kind`, or a one-line error naming `path`."""
  if value is None and optional:
    return None
  if hasattr(value, "to_dict"):  # a nested ConfigDict
    value = value.to_dict()
  if kind is None:
    return value
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind is tuple and isinstance(value, (list, tuple)):
    return tuple(value)
  if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
    return value
  raise ValueError(f"{path} must be {_WHAT[kind]}{' or None' if optional else ''}, "
                   f"got {value!r}")


# -- one section -------------------------------------------------------------------

def unknown_key(path: str, key: str, valid) -> str:
  """One line for a key the section does not have: its full path and the closest keys."""
  prefix = f"{path}." if path else ""
  names = sorted(valid)
  close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
  hint = f"did you mean {' or '.join(repr(prefix + c) for c in close)}? " if close else ""
  return f"unknown config key {prefix}{key}; {hint}valid keys: {names}"


def plain(mapping, path: str = "config") -> dict:
  """A ConfigDict, dict or None as a plain dict (references resolved)."""
  if mapping is None:
    return {}
  if hasattr(mapping, "to_dict"):
    return mapping.to_dict()
  if not isinstance(mapping, Mapping):
    raise ValueError(f"{path} must be a dict of settings, got {mapping!r}")
  return dict(mapping)


def from_mapping(cls, mapping, path: str, *, partial: bool = False):
  """`cls` (a frozen dataclass of `setting`s) from `mapping`, validated (see module doc).
  `partial`: library callers that pass only the keys they use (e.g. make_train_step with
  ConfigDict({})); required fields they leave out are None."""
  raw = plain(mapping, path)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  for key in raw:
    if key not in fields:
      raise ValueError(unknown_key(path, key, fields))
  values = {}
  for name, f in fields.items():
    where = f"{path}.{name}"
    if name not in raw:
      if f.default is dataclasses.MISSING:
        if not partial:
          raise ValueError(f"{where} is required")
        values[name] = None
      continue
    meta = f.metadata
    value = _convert(where, raw[name], meta["kind"], meta["optional"])
    if value is not None and meta["check"] is not None:
      meta["check"](where, value)
    values[name] = value
  return cls(**values)


def coerce(cls, value, path: str):
  """`value` if it already is a `cls`, else a partial `from_mapping` of it (library callers
  that still pass a ConfigDict section)."""
  return value if isinstance(value, cls) else from_mapping(cls, value, path, partial=True)
