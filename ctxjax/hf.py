"""Hugging Face interop: LLaMA-family checkpoints <-> ctxjax `Transformer` parameters.

  model, variables = ctxjax.hf.load("path/to/hf_dir")      # logits = model.apply(variables, tokens)
  ctxjax.hf.save(model, variables, "path/to/out_dir")      # loads with LlamaForCausalLM

Config: hf_config.py (`config_from_hf`, `hf_config_from`; RoPE in both HF spellings, written
identically, is ctxjax/positions/rope_hf.py's). Weights: hf_weights.py's `WEIGHTS`, the single
table both directions use. `load` reads the safetensors one parameter at a time (`tensors`)
into ctxjax.model.param_loader, the one way parameters enter a model.

LoRA adapters (and a quantized LongQLoRA base) are merged into plain kernels by `save`
(ctxjax.model.params.merge_lora); with tokenizer.model it also writes tokenizer_config.json
(hf_tokenizer.py).

Dtypes: `load` keeps the checkpoint's dtype (fp32/bf16/fp16) unless `param_dtype` is given,
in which case every tensor is cast on the host; `save` writes the model's `param_dtype`
(or `dtype=`), so a checkpoint loaded without casting is written back bit-exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from contextlib import ExitStack
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from ctxjax import hf_weights, storage
from ctxjax.hf_config import (DEFAULT_TOKEN_IDS, EXPORTABLE_ATTENTION_MODES,  # noqa: F401
                              SUPPORTED_MODEL_TYPES, config_from_hf, hf_config_from)
from ctxjax.hf_tokenizer import tokenizer_config
from ctxjax.hf_weights import WEIGHTS, Weight  # noqa: F401
from ctxjax.model import param_loader
from ctxjax.model import params as params_lib
from ctxjax.model.config import DTYPES, model_config_from_dict
from ctxjax.model.transformer import Transformer
from ctxjax.registry import unknown_choice

# safetensors dtype tag <-> ctxjax dtype name <-> numpy dtype
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}
# Tensors some checkpoints carry that hold no weights (old rotary buffers): skipped on load.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# The files of a Hugging Face model directory (`save`, transformers' save_pretrained of a model
# and its tokenizer): a directory holding only these, config.json and weights among them, is a
# previous export that save(overwrite=True) may replace. Anything else is somebody's data.
_EXPORT_FILE = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|"
                          r"special_tokens_map|added_tokens)\.json|tokenizer\.model|"
                          r"chat_template\.jinja|model(-\d+-of-\d+)?\.safetensors|"
                          r"model\.safetensors\.index\.json")


# --- load ------------------------------------------------------------------------------------

def _dtype_name(dtype, what: str) -> str | None:
  """"bfloat16" / jnp.bfloat16 / np.float32 ... -> the ctxjax dtype name (None stays None)."""
  if dtype is None or (dtype == "auto" and what == "dtype"):  # compute dtype may be "auto"
    return dtype
  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in DTYPES:
    raise ValueError(unknown_choice(what, dtype, DTYPES))
  return name


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found")
  with open(path) as f:
    return json.load(f)


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a HF directory (a missing shard named in the index: error)."""
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
      raise ValueError(f"{index} has no weight_map")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
      raise FileNotFoundError(f"{index} names shard(s) {missing} missing from {path}")
    return [path / s for s in shards]
  if (path / "model.safetensors").is_file():
    return [path / "model.safetensors"]
  found = sorted(path.glob("*.safetensors"))
  if len(found) == 1:
    return found
  if found:
    raise FileNotFoundError(f"{path} has {len(found)} .safetensors files but no "
                            "model.safetensors.index.json")
  raise FileNotFoundError(f"no model.safetensors (or shards + index) in {path}; only "
                          "safetensors checkpoints are supported (not pytorch_model.bin)")


@contextlib.contextmanager
def tensors(path, *, dtype=None, param_dtype=None, scan_layers: bool = True):
  """with tensors(dir) as (cfg, pairs): the model config of a HF LLaMA-family directory and an
  iterator of (ctxjax parameter path, host numpy array) — layer-stacked when scanned, cast to
  param_dtype — read one parameter at a time while the files are open. Every header (names,
  shapes, dtypes) is checked before any data is read; see `load` for the dtype rules."""
  from safetensors import safe_open  # noqa: PLC0415 (optional dependency)

  dtype, param_dtype = _dtype_name(dtype, "dtype"), _dtype_name(param_dtype, "param_dtype")
  path = pathlib.Path(path)
  cfg_dict = config_from_hf(_read_json(path / "config.json"))
  files = _weight_files(path)

  with ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(str(f), framework="np")) for f in files}
    where: dict[str, pathlib.Path] = {}
    for f, h in handles.items():
      for name in h.keys():
        if name in where:
          raise ValueError(f"tensor {name} appears in both {where[name].name} and {f.name}")
        where[name] = f

    def header(name):
      sl = handles[where[name]].get_slice(name)
      return _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape())

    # The stored dtype: config.json's, else the embedding's; every tensor must match it.
    stored = cfg_dict.get("param_dtype")
    if stored is None and "model.embed_tokens.weight" in where:
      stored = header("model.embed_tokens.weight")[0]
      if stored not in DTYPES:
        raise ValueError(f"tensor model.embed_tokens.weight has dtype {stored}; supported: "
                         f"{sorted(DTYPES)}")
    stored = stored or "float32"
    param_dtype = param_dtype or stored
    cfg_dict.update(param_dtype=param_dtype, dtype=dtype or param_dtype, scan_layers=scan_layers)
    cfg = model_config_from_dict(cfg_dict)
    hf_weights.check_table_matches(cfg)

    # Check every header before reading any data.
    entries = hf_weights.entries(cfg)
    wanted = {w.hf.format(i=layer): (w, layer) for w, layer in entries}
    missing = [n for n in wanted if n not in where]
    if missing:
      raise ValueError(f"checkpoint {path} is missing tensor(s) {missing[:8]}"
                       + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    extra = [n for n in where if n not in wanted and not n.endswith(_IGNORED_SUFFIXES)
             and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if extra:
      raise ValueError(f"checkpoint {path} has tensor(s) the LLaMA mapping does not use: "
                       f"{sorted(extra)[:8]}")
    for name, (w, _) in wanted.items():
      got_dtype, got_shape = header(name)
      if got_shape != tuple(w.hf_shape(cfg)):
        raise ValueError(f"tensor {name} in {where[name].name} has shape {got_shape}, but "
                         f"config.json implies {tuple(w.hf_shape(cfg))}")
      if got_dtype != stored:
        raise ValueError(f"tensor {name} in {where[name].name} has dtype {got_dtype}, but "
                         f"config.json / the checkpoint use {stored}")

    np_dtype = _NP_DTYPES[param_dtype]

    def read(w, layer):
      name = w.hf.format(i=layer)
      return w.to_ctx(handles[where[name]].get_tensor(name), cfg).astype(np_dtype, copy=False)

    def pairs():
      for w in (w for w in hf_weights.WEIGHTS if w.when(cfg)):
        if w.per_layer and cfg.scan_layers:
          stacked = np.empty((cfg.num_hidden_layers, *w.ctx_shape(cfg)), np_dtype)
          for i in range(cfg.num_hidden_layers):
            stacked[i] = read(w, i)
          yield hf_weights.ctx_path(w, cfg, None), stacked
          del stacked
        else:
          for i in (range(cfg.num_hidden_layers) if w.per_layer else [None]):
            yield hf_weights.ctx_path(w, cfg, i), read(w, i)

    yield cfg, pairs()


def load(path, *, dtype=None, param_dtype=None, scan_layers: bool = True,
         place: Callable[[str, np.ndarray], Any] | None = None) -> tuple[Transformer, dict]:
  """Load a HF LLaMA-family directory -> (Transformer, {"params": ...}).

  param_dtype: None keeps the checkpoint's dtype (all tensors must share config.json's dtype);
  otherwise tensors are cast on the host. dtype (compute) defaults to param_dtype.
  place(name, array) receives each ctxjax parameter (path like "layers/layer/self_attn/q_proj/
  kernel", a host numpy array, layer-stacked when scanned) and returns what is stored
  (default jnp.asarray); tensors are read one at a time, so about one parameter is on the
  host at once. A tied checkpoint's redundant lm_head.weight and old rotary inv_freq buffers
  are skipped; any other unused, missing, mis-shaped or mis-typed tensor is an error naming it.
  """
  with tensors(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers) as (
      cfg, pairs):
    flat = param_loader.load_params(pairs, cfg, source=f"checkpoint {path}", place=place)
  return Transformer(cfg), {"params": params_lib.unflatten(flat)}


# --- save ------------------------------------------------------------------------------------

def _hf_tensors(model: Transformer, params: dict, dtype: str):
  """[(hf name, shape, nbytes, thunk -> numpy)] for every HF tensor, in HF order."""
  cfg = model.cfg
  flat = params_lib.flatten(params)
  want = {k: tuple(v.shape) for k, v in params_lib.abstract_params(model.cfg).items()}
  got = {k: tuple(np.shape(v)) for k, v in flat.items()}
  if got != want:
    raise ValueError(f"variables do not match the model config: {hf_weights.diff(got, want)}")
  np_dtype = _NP_DTYPES[dtype]
  out = []
  for w, layer in hf_weights.entries(cfg):
    if w.per_layer and cfg.scan_layers:
      src, idx = flat[hf_weights.ctx_path(w, cfg, None)], layer
    else:
      src, idx = flat[hf_weights.ctx_path(w, cfg, layer)], None

    def thunk(w=w, src=src, idx=idx):
      x = src if idx is None else src[idx]
      return w.to_hf(np.asarray(jax.device_get(x)).astype(np_dtype, copy=False), cfg)

    shape = tuple(w.hf_shape(cfg))
    out.append((w.hf.format(i=layer), shape, math.prod(shape) * np_dtype.itemsize, thunk))
  return out


def check_target(path, *, overwrite: bool = False) -> None:
  """Refuse `path` as save's target unless it is absent, an empty directory, or (overwrite)
  a previous Hugging Face export: config.json, weights and tokenizer files only. Replacing
  anything else (a training workdir, a directory above one, ...) would delete data."""
  path = os.fspath(path)  # local or remote (gs://...): ctxjax.storage
  if storage.exists(path) and not storage.isdir(path):
    raise FileExistsError(f"{path} exists and is not a directory")
  entries = sorted(storage.listdir(path)) if storage.isdir(path) else []
  if not entries:
    return
  other = [e for e in entries
           if not (_EXPORT_FILE.fullmatch(e) and storage.isfile(storage.join(path, e)))]
  if other or "config.json" not in entries or not any(e.endswith(".safetensors")
                                                      for e in entries):
    shown = (other or entries)[:4]
    raise FileExistsError(
        f"{path} is not a Hugging Face export (it holds {', '.join(shown)}"
        f"{', ...' if len(other or entries) > 4 else ''}) and is never replaced; "
        "choose a new or empty output directory")
  if not overwrite:
    raise FileExistsError(f"{path} holds a Hugging Face export; pass overwrite=True "
                          "(--overwrite) to replace it")


def save(model: Transformer, variables, path, *, overwrite: bool = False,
         tokenizer_model=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
         dtype: str | None = None, token_ids: Mapping[str, int] | None = None) -> None:
  """Write `variables` as a HF LlamaForCausalLM directory at `path`.

  Writes config.json (hf_config_from), generation_config.json, model.safetensors (or
  model-0000k-of-0000n.safetensors shards of at most max_shard_bytes + index) in `dtype`
  (default the model's param_dtype), and tokenizer.model when given. Everything is written
  into a temporary sibling directory and renamed into place. A non-empty `path` is an error
  unless it is a previous export and overwrite=True (check_target). token_ids: bos/eos/pad
  ids for the configs (default: ctxjax's tokenizer, DEFAULT_TOKEN_IDS).
  """
  from safetensors.numpy import save_file  # noqa: PLC0415 (optional dependency)

  cfg = model.cfg
  if cfg.memory_kind != "none":
    raise ValueError(f"model.memory_kind={cfg.memory_kind!r}: transformers has no LLaMA with "
                     "memory layers; only memory_kind='none' models export")
  if cfg.lora_rank or cfg.base_quantization != "none":  # LongLoRA / LongQLoRA: one plain kernel
    variables = {"params": params_lib.merge_lora(variables["params"], cfg)}
    model = Transformer(params_lib.base_config(cfg))
    cfg = model.cfg
  dtype = _dtype_name(dtype, "dtype") or cfg.param_dtype
  if not (isinstance(max_shard_bytes, int) and max_shard_bytes > 0):
    raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
  hf_config = hf_config_from(dataclasses.replace(cfg, param_dtype=dtype), token_ids)
  path = pathlib.Path(path)
  check_target(path, overwrite=overwrite)
  if tokenizer_model is not None and not pathlib.Path(tokenizer_model).is_file():
    raise FileNotFoundError(f"tokenizer_model {tokenizer_model} not found")

  tensors = _hf_tensors(model, nn.meta.unbox(variables["params"]), dtype)
  shards: list[list] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t[2] > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t[2]

  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    n = len(shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
    weight_map = {}
    for fname, shard in zip(names, shards):
      save_file({name: thunk() for name, _, _, thunk in shard}, str(tmp / fname),
                metadata={"format": "pt"})
      weight_map.update({name: fname for name, *_ in shard})
    if n > 1:
      index = {"metadata": {"total_size": sum(t[2] for t in tensors)}, "weight_map": weight_map}
      _write_json(tmp / "model.safetensors.index.json", index)
    _write_json(tmp / "config.json", hf_config)
    gen = {"_from_model_config": True}
    gen.update({k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf_config.get(k) is not None})
    _write_json(tmp / "generation_config.json", gen)
    if tokenizer_model is not None:
      shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
      _write_json(tmp / "tokenizer_config.json",
                  tokenizer_config(tokenizer_model, hf_config, cfg.max_position_embeddings))
    for f in tmp.iterdir():  # tempfile and safetensors create owner-only files
      os.chmod(f, 0o644)
    os.chmod(tmp, 0o755)
    if path.exists():
      trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
      os.replace(path, trash / path.name)
      os.replace(tmp, path)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_json(path: pathlib.Path, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
