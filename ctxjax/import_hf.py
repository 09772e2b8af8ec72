"""Import a Hugging Face LLaMA-family checkpoint into a ctxjax workdir.

  python -m ctxjax.import_hf --hf_dir=DIR --workdir=DIR [--param_dtype=bfloat16] [--noscan_layers]

Writes WORKDIR/model_config.json (the ctxjax model config, HF key names), the params as an
orbax checkpoint in WORKDIR/hf_import/ (tree {"params": ...} minus the outer key, i.e. the
`params` dict), and WORKDIR/hf_token_ids.json (bos/eos/pad ids, so export_hf writes them
back). `python -m ctxjax.export_hf --workdir=DIR --out=DIR` reads exactly these.
"""
from __future__ import annotations

import json
import os
import tempfile

from absl import app, flags, logging

from ctxjax import storage

PARAMS_DIR = "hf_import"
MODEL_CONFIG = "model_config.json"
TOKEN_IDS = "hf_token_ids.json"


def define_flags() -> None:
  """The CLI's flags (defined on demand, so importing this module defines none)."""
  flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (config.json + "
                      "model.safetensors or shards + index).")
  flags.DEFINE_string("workdir", None, "ctxjax workdir to write into.")
  flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                    "Cast the weights to this dtype (default: keep the checkpoint's).")
  flags.DEFINE_bool("scan_layers", True, "Stack the layers (nn.scan layout).")
  flags.DEFINE_bool("overwrite", False, f"Replace an existing WORKDIR/{PARAMS_DIR}.")
  flags.mark_flags_as_required(["hf_dir", "workdir"])


def import_hf(hf_dir: str, workdir: str, *, param_dtype: str | None = None,
              scan_layers: bool = True, overwrite: bool = False) -> dict:
  """Load `hf_dir` with ctxjax.hf.load and write it into `workdir`; returns a summary dict."""
  import jax  # noqa: PLC0415  (heavy imports after flag parsing: `--help` stays fast)
  import orbax.checkpoint as ocp  # noqa: PLC0415

  if not storage.is_local(hf_dir):  # hf.load reads local files: fetch a remote directory
    with tempfile.TemporaryDirectory(prefix="ctxjax-import-") as tmp:
      storage.copy_tree(hf_dir, tmp)
      return {**import_hf(tmp, workdir, param_dtype=param_dtype, scan_layers=scan_layers,
                          overwrite=overwrite), "hf_dir": storage.resolve(hf_dir)}
  from ctxjax import hf  # noqa: PLC0415

  model, variables = hf.load(hf_dir, param_dtype=param_dtype, scan_layers=scan_layers)
  workdir = storage.resolve(workdir)
  storage.makedirs(workdir)
  target = storage.join(workdir, PARAMS_DIR)
  if storage.exists(target) and not overwrite:
    raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, variables["params"], force=overwrite)
  checkpointer.wait_until_finished()
  cfg = model.cfg
  storage.write_text(storage.join(workdir, MODEL_CONFIG),
                     json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
  with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
    hf_config = json.load(f)
  token_ids = {k: hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  storage.write_text(storage.join(workdir, TOKEN_IDS), json.dumps(token_ids, indent=2))
  leaves = jax.tree_util.tree_leaves(variables["params"])
  rope = cfg.rope_scaling or {"rope_type": "default"}
  return {
      "hf_dir": os.path.abspath(hf_dir), "model_type": hf_config.get("model_type"),
      "params_dir": target, "model_config": storage.join(workdir, MODEL_CONFIG),
      "num_params": int(sum(x.size for x in leaves)), "num_arrays": len(leaves),
      "param_dtype": cfg.param_dtype, "scan_layers": cfg.scan_layers,
      "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
      "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
      "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": cfg.tie_word_embeddings, "rope_theta": cfg.rope_theta,
      "rope_type": rope["rope_type"], "rope_scaling": cfg.rope_scaling,
      "max_position_embeddings": cfg.max_position_embeddings, **token_ids,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  from ctxjax import cli  # noqa: PLC0415
  f = flags.FLAGS
  cli.input_dir(f.hf_dir, "--hf_dir", "a Hugging Face model directory (config.json + "
                "*.safetensors)")
  cli.output_dir(f.workdir, "--workdir")
  with cli.flag_names(overwrite="--overwrite"):
    summary = import_hf(f.hf_dir, f.workdir, param_dtype=f.param_dtype,
                        scan_layers=f.scan_layers, overwrite=f.overwrite)
  print(f"imported {summary['hf_dir']} ({summary['model_type']}): "
        f"{summary['num_params']:,} parameters in {summary['num_arrays']} arrays, "
        f"{summary['param_dtype']}, {summary['layers']} layers x hidden {summary['hidden_size']}, "
        f"heads {summary['heads']}/{summary['kv_heads']} x {summary['head_dim']}, "
        f"vocab {summary['vocab_size']}, rope {summary['rope_type']} theta "
        f"{summary['rope_theta']:g}, max_position_embeddings "
        f"{summary['max_position_embeddings']}")
  print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  from ctxjax import cli
  define_flags()
  cli.run("ctxjax.import_hf", main)
