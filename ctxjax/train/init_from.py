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

from absl import logging

from ctxjax.model import param_loader
from ctxjax.model import params as params_lib
from ctxjax.train import checkpoint as checkpoint_lib

# New LoRA adapters on a plain checkpoint are LongLoRA's start: they keep their init; a float
# checkpoint under a quantized base is LongQLoRA's (its kernels are quantized on load).
_ADAPTER_KEYS = ("lora_rank", "lora_targets", "base_quantization", "quant_block_size")


def _from_run(workdir: str, shardings: dict, model_cfg) -> tuple[dict, str]:
  directory = checkpoint_lib.checkpoint_dir(workdir)
  try:
    saved, meta, step = checkpoint_lib.read_params(directory)
  except ValueError as e:
    raise ValueError(f"config.train.init_from={workdir!r}: {e}") from None
  diffs = checkpoint_lib.config_differences(meta.get("model_config", {}), model_cfg.to_dict(),
                                            ignore=_ADAPTER_KEYS)
  if diffs:
    raise ValueError(f"config.train.init_from={workdir!r} (step {step}) holds a different "
                     f"model; differing model config keys: {'; '.join(diffs)}")
  source = f"config.train.init_from={workdir!r} (step {step})"
  return param_loader.load_params(saved.items(), model_cfg, source=source,
                                  shardings=shardings), f"{workdir} (step {step})"


def _from_hf(hf_dir: str, shardings: dict, model_cfg) -> tuple[dict, str]:
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
  with hf.tensors(hf_dir, param_dtype=model_cfg.param_dtype,
                  scan_layers=model_cfg.scan_layers) as (_, pairs):
    loaded = param_loader.load_params(pairs, model_cfg, shardings=shardings,
                                      source=f"config.train.init_from_hf={hf_dir!r}")
  return loaded, hf_dir


def initial_params(train_cfg, params, param_shardings, model_cfg):
  """`params`, or the parameters `train_cfg.init_from` / `init_from_hf` names (see above)."""
  workdir, hf_dir = train_cfg.init_from, train_cfg.init_from_hf
  if workdir and hf_dir:
    raise ValueError("config.train.init_from and config.train.init_from_hf are both set; "
                     "choose one")
  if not (workdir or hf_dir):
    return params
  shardings = params_lib.flatten(param_shardings)
  if workdir:
    loaded, source = _from_run(workdir, shardings, model_cfg)
  else:
    loaded, source = _from_hf(hf_dir, shardings, model_cfg)
  logging.info("initial parameters from %s; kept initialised: %s", source,
               param_loader.missing(loaded, model_cfg) or "none")
  return params_lib.unflatten({**params_lib.flatten(params), **loaded})
