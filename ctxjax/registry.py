"""One registry type for every "name -> thing" table in ctxjax (kernels, patterns, positional
schemes, rope types, attention modes, data sources, ...), so every "unknown X" error is written
once: it names the config key, the bad value, the closest valid names and all valid choices.

  KERNELS = Registry("model.attention_impl")
  @KERNELS.register("blockwise")
  def blockwise(...): ...
  KERNELS.get(cfg.attention_impl)   # ValueError: model.attention_impl='blokwise'; did you
                                    # mean 'blockwise'? valid choices: [...]

This module imports nothing from ctxjax: every layer may use it.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def unknown_choice(key: str, value, choices) -> str:
  """The one-line message for a value that is not among `choices` (closest names first)."""
  names = sorted(str(c) for c in choices)
  close = difflib.get_close_matches(str(value), names, n=3, cutoff=0.6)
  hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
  return f"{key}={value!r}; {hint}valid choices: {names}"


class Registry(Generic[T]):
  """An ordered name -> value table whose lookups fail with `unknown_choice`'s message.

  `key` is what the user sets (a config path such as "model.attention_impl"); it is the first
  word of every error. Registering a name twice is a programming error and raises.
  """

  def __init__(self, key: str):
    self.key = key
    self._items: dict[str, T] = {}

  def add(self, name: str, value: T) -> T:
    if name in self._items:
      raise KeyError(f"{self.key}: {name!r} is registered twice")
    self._items[name] = value
    return value

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator form of `add`."""
    return lambda value: self.add(name, value)

  def get(self, name: str, *, key: str | None = None) -> T:
    """The value registered as `name`; `key` overrides the config path named in the error."""
    if name not in self._items:
      raise ValueError(unknown_choice(key or self.key, name, self._items))
    return self._items[name]

  def check(self, name: str, *, key: str | None = None) -> str:
    """`name` itself, after checking that it is registered."""
    self.get(name, key=key)
    return name

  def __contains__(self, name) -> bool:
    return name in self._items

  def __getitem__(self, name: str) -> T:
    return self.get(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def names(self) -> list[str]:
    return sorted(self._items)

  def items(self):
    return self._items.items()

  def values(self):
    return self._items.values()

  def __repr__(self) -> str:
    return f"Registry({self.key!r}, {self.names()})"
