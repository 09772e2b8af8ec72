"""Where a run's first parameters come from: its own random init, another ctxjax run
(`config.train.init_from=WORKDIR`, parameters only) or a Hugging Face LLaMA-family directory
(`config.train.init_from_hf=DIR`) — continual pretraining (Fu et al. 2024 start from LLaMA-2).

Only the parameters are replaced: the optimizer state, step, RNG and data order start fresh
(Adam's moments start at zero whatever the parameters are). Each tensor goes straight into its
sharding, one at a time, so a model larger than one host's device memory loads onto a mesh.
Parameters the source lacks (e.g. new LoRA adapters) keep their initialisation and are logged;
anything else that does not match is an error naming the tensor. Under a quantized base
(`model.base_quantization`, LongQLoRA) float kernels from either source are quantized on load,
one kernel at a time, into the model's codes + absmax.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from ctxjax.train import checkpoint as checkpoint_lib


def _flat(tree, prefix=()):
  return checkpoint_lib._flat(tree, prefix)  # noqa: SLF001 (one flattening rule for both)


def _overlay(params, loaded_flat: dict[tuple, jax.Array]):
  """`params` with the leaves at `loaded_flat`'s paths replaced."""
  flat = _flat(params)
  flat.update(loaded_flat)
  return checkpoint_lib._unflat(flat)  # noqa: SLF001


def _quantizer(model_cfg):
  """None for a float base; else ('/'-path, float kernel) -> {'/'-path: codes / absmax}."""
  from ctxjax.model import params as params_lib  # noqa: PLC0415
  if model_cfg.base_quantization == "none":
    return None
  return lambda path, kernel: params_lib.quantize_kernel(model_cfg, path, kernel)


def _from_hf(hf_dir: str, shardings, model_cfg):
  from ctxjax import hf  # noqa: PLC0415 (safetensors only when used)
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"config.train.init_from_hf={hf_dir!r}: no config.json there")
  with open(path, encoding="utf-8") as f:
    hf_cfg = hf.config_from_hf(json.load(f))
  hf_cfg["scan_layers"] = model_cfg.scan_layers
  diffs = checkpoint_lib.config_differences(hf_cfg, model_cfg.to_dict())
  if diffs:
    raise ValueError(f"config.train.init_from_hf={hf_dir!r} holds a different model; differing "
                     f"model config keys (HF -> config.model): {'; '.join(diffs)}")
  by_path = {"/".join(p): s for p, s in _flat(shardings).items()}
  quantize = _quantizer(model_cfg)
  loaded = {}

  def put(name, array):
    if name not in by_path:
      raise ValueError(f"config.train.init_from_hf: tensor for {name} has no place in the model")
    array = np.asarray(array)
    loaded[tuple(name.split("/"))] = jax.make_array_from_callback(
        array.shape, by_path[name], lambda index: array[index])

  def place(name, array):
    module = name.rsplit("/", 1)[0]
    if quantize is not None and name not in by_path and f"{module}/kernel_absmax" in by_path:
      for sub, value in quantize(name, array).items():
        put(sub, value)
    else:
      put(name, array)
    return None  # kept in `loaded`; hf.load's own tree is not used

  hf.load(hf_dir, param_dtype=model_cfg.param_dtype, scan_layers=model_cfg.scan_layers,
          place=place)
  return loaded


def initial_params(train_cfg, params, param_shardings, model_cfg):
  """`params`, or the parameters `train_cfg.init_from` / `init_from_hf` names (see above)."""
  workdir, hf_dir = train_cfg.get("init_from", ""), train_cfg.get("init_from_hf", "")
  if workdir and hf_dir:
    raise ValueError("config.train.init_from and config.train.init_from_hf are both set; "
                     "choose one")
  if not (workdir or hf_dir):
    return params
  if workdir:
    abstract = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                            params, param_shardings)
    restored, missing, step = checkpoint_lib.restore_params(
        workdir, abstract, model_config=model_cfg.to_dict(),
        quantize_on_load=_quantizer(model_cfg))
    loaded, source = _flat(restored), f"{workdir} (step {step})"
  else:
    loaded, source = _from_hf(hf_dir, param_shardings, model_cfg), hf_dir
    missing = sorted("/".join(p) for p in _flat(params) if p not in loaded)
  logging.info("initial parameters from %s; kept initialised: %s", source, missing or "none")
  return _overlay(params, loaded)
