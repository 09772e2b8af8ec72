"""The one way parameters enter a model: (path, host numpy array) pairs -> placed arrays.

Orbax checkpoints (ctxjax/train/checkpoint.py) and Hugging Face safetensors (ctxjax/hf.py) both
yield pairs; `load_params` checks each against `Transformer(cfg)`'s abstract parameters (a
one-line error naming the path), quantizes a float kernel when `cfg` stores it quantized
(LongQLoRA: Yang 2023; QLoRA, Dettmers et al. 2023) and places each tensor into its sharding,
one at a time, as big_vision loads a checkpoint on the host and then reshards it (Beyer et al.
2022), so a model larger than one device loads onto a mesh with about one tensor in flight.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ctxjax.model import params as params_lib


def put(array, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """A host array as a jax.Array: in `sharding` (each device reads its own slice, so every
  process may hold the whole array, as on multi-host), or on the default device."""
  array = np.asarray(array)
  if sharding is None:
    return jnp.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_params(pairs: Iterable[tuple[str, Any]], cfg, *, source: str,
                shardings: Mapping[str, jax.sharding.Sharding] | None = None,
                place: Callable[[str, np.ndarray], Any] | None = None) -> dict[str, Any]:
  """{'/'-path: placed array} for the pairs, in the parameters of `Transformer(cfg)`.

  Each array is cast on the host to the parameter's dtype; a float kernel of a projection `cfg`
  stores quantized becomes its codes + absmax. `place(path, host array)` stores a tensor
  (default: `put` into `shardings[path]`, or the default device). Paths the pairs do not cover
  are simply absent (the caller keeps its initialisation, e.g. new LoRA adapters); a tensor
  with no place in the model, or of another shape, is an error naming `source` and the path.
  """
  want = params_lib.abstract_params(cfg)
  if place is None:
    place = lambda path, array: put(array, None if shardings is None else shardings[path])
  out = {}
  for path, array in pairs:
    if path not in want and params_lib.is_quantizable(cfg, path):
      quantized = params_lib.quantize_kernel(cfg, path, array)
      out.update({p: place(p, np.asarray(v)) for p, v in quantized.items()})
      continue
    if path not in want:
      raise ValueError(f"{source}: tensor {path} has no place in the model")
    shape, dtype = tuple(want[path].shape), want[path].dtype
    if tuple(np.shape(array)) != shape:
      raise ValueError(f"{source}: parameter {path} has shape {tuple(np.shape(array))} there, "
                       f"{shape} here")
    out[path] = place(path, np.asarray(array).astype(dtype, copy=False))
  return out


def missing(loaded: Mapping[str, Any], cfg) -> list[str]:
  """Parameters of `Transformer(cfg)` that `loaded` lacks, sorted."""
  return sorted(set(params_lib.abstract_params(cfg)) - set(loaded))
