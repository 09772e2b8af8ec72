"""Export a ctxjax workdir as a Hugging Face LlamaForCausalLM directory.

  python -m ctxjax.export_hf --workdir=DIR --out=DIR [--overwrite] [--tokenizer_model=FILE]

Reads a training run's workdir (`python -m ctxjax.train`: the newest orbax checkpoint, or
--step) or what `python -m ctxjax.import_hf` writes (WORKDIR/model_config.json + the orbax params
in WORKDIR/hf_import/); `read_workdir` is the one place that knows these layouts. LoRA adapters
(LongLoRA) are merged into the kernels and a quantized base (LongQLoRA) is dequantized; with
--tokenizer_model, tokenizer_config.json is written too (AutoTokenizer loads the directory).
--out lies outside --workdir and is new, empty or (with --overwrite) a previous export: any
other directory is refused before anything is read (`check_out`), never deleted.
"""
from __future__ import annotations

import os
import tempfile

from absl import app, flags, logging

from ctxjax import storage
from ctxjax.import_hf import TOKEN_IDS

CHECKPOINTS = "checkpoints"  # ctxjax/train/checkpoint.py: WORKDIR/checkpoints/<step>/


def define_flags() -> None:
  """The CLI's flags (defined on demand, so importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "ctxjax workdir (a training run's, or import_hf's).")
  flags.DEFINE_integer("step", None, "Checkpoint step of a training run (default: newest).")
  flags.DEFINE_string("out", None, "Output Hugging Face directory.")
  flags.DEFINE_bool("overwrite", False, "Replace a previous Hugging Face export at --out "
                    "(any other non-empty directory is refused).")
  flags.DEFINE_string("tokenizer_model", None, "sentencepiece model to copy as tokenizer.model.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "dtype of the written weights (default: the model's param_dtype).")
  flags.DEFINE_integer("max_shard_bytes", 5 * 10**9, "Largest safetensors shard, in bytes.")
  flags.mark_flags_as_required(["workdir", "out"])


def check_out(workdir: str, out: str, overwrite: bool = False) -> None:
  """Refuse, before reading anything, an --out that is --workdir, inside it or above it (the
  export would replace the run), or that holds anything but a previous export (hf.check_target:
  a directory is replaced only when it is one, and only with --overwrite)."""
  from ctxjax import hf  # noqa: PLC0415

  run, target = (_parts(p) for p in (workdir, out))
  common = run[:min(len(run), len(target))]
  if target[:len(common)] == common:  # one is the other or lies inside it
    where = "is" if run == target else "is inside" if len(common) == len(run) else "contains"
    raise ValueError(f"--out={out} {where} --workdir={workdir}: the export would replace the "
                     "run; choose an --out outside it")
  try:
    hf.check_target(out, overwrite=overwrite)
  except FileExistsError as err:  # a user error of the command line: ValueError, named flag
    raise ValueError(f"--out: {err}") from None


def _parts(path: str) -> list[str]:
  """A path's components for containment tests: resolved locally, the scheme kept remotely."""
  resolved = os.path.realpath(path) if storage.is_local(path) else storage.resolve(path)
  return [p for p in resolved.split("/") if p]


def read_workdir(workdir: str, step: int | None = None):
  """(model, variables, token_ids) from a workdir, the one place that knows its layouts:
  a training run's orbax checkpoints (WORKDIR/checkpoints/<step>/{state,meta}, written by
  ctxjax/train/checkpoint.py: the model config is in `meta`, the parameters in state.params;
  the newest step unless `step`), else what import_hf writes (model_config.json + hf_import/).
  Parameters are restored to host numpy arrays; LoRA/quantized ones are merged by hf.save."""
  workdir = storage.resolve(workdir)
  if storage.isdir(storage.join(workdir, CHECKPOINTS)):
    model, params = _read_training_checkpoint(storage.join(workdir, CHECKPOINTS), step)
  else:
    if step is not None:
      raise ValueError(f"--step={step} given, but {workdir} has no {CHECKPOINTS}/ directory")
    model, params = _read_import(workdir)
  token_ids = None
  token_path = storage.join(workdir, TOKEN_IDS)
  if storage.exists(token_path):
    token_ids = {k: v for k, v in storage.read_json(token_path).items()
                 if v is not None}
  return model, {"params": params}, token_ids


def _checked(model, flat: dict, source: str) -> dict:
  """`flat` as the model's parameter tree, checked by the one parameter loader (kept on the
  host: hf.save reads them one at a time)."""
  from ctxjax.model import param_loader  # noqa: PLC0415 (`--help` stays fast)
  from ctxjax.model import params as params_lib  # noqa: PLC0415
  loaded = param_loader.load_params(flat.items(), model.cfg, source=source,
                                    place=lambda path, array: array)
  missing = param_loader.missing(loaded, model.cfg)
  if missing:
    raise ValueError(f"{source} lacks parameter(s) {missing[:8]}")
  return params_lib.unflatten(loaded)


def _read_import(workdir: str):
  from ctxjax import import_hf  # noqa: PLC0415
  from ctxjax.model import Transformer, model_config_from_dict  # noqa: PLC0415
  from ctxjax.train import checkpoint  # noqa: PLC0415

  config_path = storage.join(workdir, import_hf.MODEL_CONFIG)
  params_dir = storage.join(workdir, import_hf.PARAMS_DIR)
  for p in (config_path, params_dir):
    if not storage.exists(p):
      raise FileNotFoundError(f"{p} not found: {workdir} holds neither a training run's "
                              f"{CHECKPOINTS}/ nor an import (run python -m ctxjax.import_hf)")
  model = Transformer(model_config_from_dict(storage.read_json(config_path)))
  return model, _checked(model, checkpoint.read_tree(params_dir), params_dir)


def _read_training_checkpoint(directory: str, step: int | None):
  from ctxjax.model import Transformer, model_config_from_dict  # noqa: PLC0415
  from ctxjax.train import checkpoint  # noqa: PLC0415

  flat, meta, step = checkpoint.read_params(directory, step, step_flag="--step")
  if "model_config" not in meta:
    raise ValueError(f"{directory}/{step} has no model_config in its metadata")
  model = Transformer(model_config_from_dict(meta["model_config"]))
  return model, _checked(model, flat, f"{directory}/{step}")


def save(model, variables, out: str, **kwargs) -> None:
  """hf.save into `out`; a remote `out` (gs://...) is written into a local temporary directory
  and copied up (hf.save renames a finished directory into place; object stores cannot)."""
  from ctxjax import hf  # noqa: PLC0415
  if storage.is_local(out):
    hf.save(model, variables, out, **kwargs)
    return
  hf.check_target(out, overwrite=kwargs.get("overwrite", False))  # only an export is replaced
  replace = storage.isdir(out) and bool(storage.listdir(out))
  with tempfile.TemporaryDirectory(prefix="ctxjax-export-") as tmp:
    local = os.path.join(tmp, storage.basename(out))
    hf.save(model, variables, local, **kwargs)
    if replace:  # only once the new export is complete
      storage.rmtree(out)
    storage.copy_tree(local, out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ctxjax import cli  # noqa: PLC0415

  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  f = flags.FLAGS
  cli.input_dir(f.workdir, "--workdir", "a training run's or import_hf's workdir")
  cli.output_dir(f.out, "--out")
  check_out(f.workdir, f.out, f.overwrite)
  model, variables, token_ids = read_workdir(f.workdir, f.step)
  with cli.flag_names(overwrite="--overwrite"):  # hf.save's hints name its keywords
    save(model, variables, f.out, overwrite=f.overwrite, tokenizer_model=f.tokenizer_model,
         max_shard_bytes=f.max_shard_bytes, dtype=f.dtype, token_ids=token_ids)
  files = storage.listdir(f.out)
  cfg = model.cfg
  print(f"exported {f.workdir} -> {f.out}: LlamaForCausalLM, "
        f"{cfg.num_hidden_layers} layers x hidden {cfg.hidden_size}, "
        f"{f.dtype or cfg.param_dtype}, rope "
        f"{(cfg.rope_scaling or {'rope_type': 'default'})['rope_type']}, "
        f"max_position_embeddings {cfg.max_position_embeddings}"
        + (f", LoRA r={cfg.lora_rank} merged" if cfg.lora_rank else "")
        + (f", {cfg.base_quantization} base dequantized" if cfg.base_quantization != "none"
           else "") + f"; files {files}")


if __name__ == "__main__":
  from ctxjax import cli
  define_flags()
  cli.run("ctxjax.export_hf", main)
