"""Export a ctxjax workdir as a Hugging Face LlamaForCausalLM directory.

  python -m ctxjax.export_hf --workdir=DIR --out=DIR [--overwrite] [--tokenizer_model=FILE]

Reads what `python -m ctxjax.import_hf` writes (WORKDIR/model_config.json + the orbax params
in WORKDIR/hf_import/); `read_workdir` is the one place that knows that layout.
"""
from __future__ import annotations

import json
import os

from absl import app, flags, logging


def define_flags() -> None:
  """The CLI's flags (defined on demand, so importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "ctxjax workdir (as written by import_hf).")
  flags.DEFINE_string("out", None, "Output Hugging Face directory.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
  flags.DEFINE_string("tokenizer_model", None, "sentencepiece model to copy as tokenizer.model.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "dtype of the written weights (default: the model's param_dtype).")
  flags.DEFINE_integer("max_shard_bytes", 5 * 10**9, "Largest safetensors shard, in bytes.")
  flags.mark_flags_as_required(["workdir", "out"])


def read_workdir(workdir: str):
  """(model, variables, token_ids) from a workdir. Extend here for the trainer's checkpoints."""
  import jax  # noqa: PLC0415  (heavy imports after flag parsing: `--help` stays fast)
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from flax import linen as nn  # noqa: PLC0415

  from ctxjax import import_hf  # noqa: PLC0415
  from ctxjax.model import Transformer, model_config_from_dict  # noqa: PLC0415

  workdir = os.path.abspath(workdir)
  config_path = os.path.join(workdir, import_hf.MODEL_CONFIG)
  params_dir = os.path.join(workdir, import_hf.PARAMS_DIR)
  for p in (config_path, params_dir):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} not found (run python -m ctxjax.import_hf first)")
  with open(config_path, encoding="utf-8") as f:
    model = Transformer(model_config_from_dict(json.load(f)))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 1), jax.numpy.int32))
  params = ocp.StandardCheckpointer().restore(params_dir, nn.meta.unbox(abstract["params"]))
  token_ids = None
  token_path = os.path.join(workdir, import_hf.TOKEN_IDS)
  if os.path.exists(token_path):
    with open(token_path, encoding="utf-8") as f:
      token_ids = {k: v for k, v in json.load(f).items() if v is not None}
  return model, {"params": params}, token_ids


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ctxjax import hf  # noqa: PLC0415

  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  f = flags.FLAGS
  model, variables, token_ids = read_workdir(f.workdir)
  hf.save(model, variables, f.out, overwrite=f.overwrite, tokenizer_model=f.tokenizer_model,
          max_shard_bytes=f.max_shard_bytes, dtype=f.dtype, token_ids=token_ids)
  files = sorted(os.listdir(f.out))
  cfg = model.cfg
  print(f"exported {f.workdir} -> {f.out}: LlamaForCausalLM, "
        f"{cfg.num_hidden_layers} layers x hidden {cfg.hidden_size}, "
        f"{f.dtype or cfg.param_dtype}, rope "
        f"{(cfg.rope_scaling or {'rope_type': 'default'})['rope_type']}, "
        f"max_position_embeddings {cfg.max_position_embeddings}; files {files}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
