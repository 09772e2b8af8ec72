"""Hugging Face interop: LLaMA-family checkpoints <-> ctxjax `Transformer` parameters.

  model, variables = ctxjax.hf.load("path/to/hf_dir")      # logits = model.apply(variables, tokens)
  ctxjax.hf.save(model, variables, "path/to/out_dir")      # loads with LlamaForCausalLM

Config: `config_from_hf` reads both RoPE spellings (transformers >= 5 `rope_parameters`;
< 5 top-level `rope_theta` + `rope_scaling` with "type" or "rope_type") and `hf_config_from`
writes both, kept identical (TECHNIQUES.md section 20.1). Weights: `WEIGHTS` is the single
table (ctxjax path, HF name, transform) both directions use, for the scanned (`layers/layer/...`,
leading layer axis) and the unrolled (`layers_{i}/...`) layouts. ctxjax is rotate-half like HF,
so q/k need no permutation; only torch's [out, in] Linear layout is transposed and reshaped.

LoRA adapters (and a quantized LongQLoRA base) are merged into plain kernels by `save`
(ctxjax.model.params.merge_lora); with tokenizer.model it also writes tokenizer_config.json.

Dtypes: `load` keeps the checkpoint's dtype (fp32/bf16/fp16) unless `param_dtype` is given,
in which case every tensor is cast on the host; `save` writes the model's `param_dtype`
(or `dtype=`), so a checkpoint loaded without casting is written back bit-exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
import contextlib
from contextlib import ExitStack
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from ctxjax.model import param_loader
from ctxjax.model import params as params_lib
from ctxjax.model.config import DTYPES, ModelConfig, model_config_from_dict
from ctxjax.model.transformer import Transformer
from ctxjax.positions.rope import ROPE_TYPES

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# safetensors dtype tag <-> ctxjax dtype name <-> numpy dtype
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}
# Tensors some checkpoints carry that hold no weights (old rotary buffers): skipped on load.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# ctxjax tokenizer special ids (ctxjax/data/tokenizer.py); the default for exported configs.
DEFAULT_TOKEN_IDS = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
EXPORTABLE_ATTENTION_MODES = ("standard", "s2")
# LlamaConfig defaults (transformers 5.23) for the optional keys.
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "initializer_range": 0.02,
                "max_position_embeddings": 2048}


# --- the weight table ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Weight:
  """One parameter. `ctx`: path under params (inside a block when `per_layer`); `hf`: the HF
  tensor name ({i} = layer index); `hf_shape(cfg)` / `ctx_shape(cfg)`: per-layer shapes.
  The transform is torch-Linear's: HF [out, in] <-> ctxjax [in..., out...] (transpose+reshape),
  or the identity when `linear` is False."""
  ctx: str
  hf: str
  hf_shape: Callable[[ModelConfig], tuple]
  ctx_shape: Callable[[ModelConfig], tuple]
  linear: bool = False
  per_layer: bool = False
  when: Callable[[ModelConfig], bool] = lambda cfg: True

  def to_ctx(self, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return np.ascontiguousarray(w.T).reshape(self.ctx_shape(cfg)) if self.linear else w

  def to_hf(self, k: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if not self.linear:
      return np.ascontiguousarray(k)
    return np.ascontiguousarray(k.reshape(self.hf_shape(cfg)[::-1]).T)


def _dims(cfg):
  return (cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
          cfg.head_dim, cfg.intermediate_size)


def _w(ctx, hf, hf_shape, ctx_shape=None, **kw):
  return Weight(ctx, hf, lambda c: hf_shape(*_dims(c)),
                lambda c: (ctx_shape or hf_shape)(*_dims(c)), **kw)


_L = "model.layers.{i}."
WEIGHTS: tuple[Weight, ...] = (
    _w("embed_tokens/embedding", "model.embed_tokens.weight", lambda V, E, H, K, D, M: (V, E)),
    _w("input_layernorm/scale", _L + "input_layernorm.weight",
       lambda V, E, H, K, D, M: (E,), per_layer=True),
    _w("self_attn/q_proj/kernel", _L + "self_attn.q_proj.weight",
       lambda V, E, H, K, D, M: (H * D, E), lambda V, E, H, K, D, M: (E, H, D),
       linear=True, per_layer=True),
    _w("self_attn/k_proj/kernel", _L + "self_attn.k_proj.weight",
       lambda V, E, H, K, D, M: (K * D, E), lambda V, E, H, K, D, M: (E, K, D),
       linear=True, per_layer=True),
    _w("self_attn/v_proj/kernel", _L + "self_attn.v_proj.weight",
       lambda V, E, H, K, D, M: (K * D, E), lambda V, E, H, K, D, M: (E, K, D),
       linear=True, per_layer=True),
    _w("self_attn/o_proj/kernel", _L + "self_attn.o_proj.weight",
       lambda V, E, H, K, D, M: (E, H * D), lambda V, E, H, K, D, M: (H, D, E),
       linear=True, per_layer=True),
    _w("post_attention_layernorm/scale", _L + "post_attention_layernorm.weight",
       lambda V, E, H, K, D, M: (E,), per_layer=True),
    _w("mlp/gate_proj/kernel", _L + "mlp.gate_proj.weight", lambda V, E, H, K, D, M: (M, E),
       lambda V, E, H, K, D, M: (E, M), linear=True, per_layer=True),
    _w("mlp/up_proj/kernel", _L + "mlp.up_proj.weight", lambda V, E, H, K, D, M: (M, E),
       lambda V, E, H, K, D, M: (E, M), linear=True, per_layer=True),
    _w("mlp/down_proj/kernel", _L + "mlp.down_proj.weight", lambda V, E, H, K, D, M: (E, M),
       lambda V, E, H, K, D, M: (M, E), linear=True, per_layer=True),
    _w("norm/scale", "model.norm.weight", lambda V, E, H, K, D, M: (E,)),
    _w("lm_head/kernel", "lm_head.weight", lambda V, E, H, K, D, M: (V, E),
       lambda V, E, H, K, D, M: (E, V), linear=True, when=lambda c: not c.tie_word_embeddings),
)


def _ctx_path(w: Weight, cfg: ModelConfig, layer: int | None) -> str:
  """Full ctxjax param path of `w` (for the stacked tensor when scanned, layer=None)."""
  if not w.per_layer:
    return w.ctx
  return f"layers/layer/{w.ctx}" if cfg.scan_layers else f"layers_{layer}/{w.ctx}"


def _entries(cfg: ModelConfig):
  """(weight, layer or None) for every HF tensor of `cfg`, in HF order (layer-major)."""
  active = [w for w in WEIGHTS if w.when(cfg)]
  out = [(w, None) for w in active if not w.per_layer and w.ctx.startswith("embed")]
  for i in range(cfg.num_hidden_layers):
    out += [(w, i) for w in active if w.per_layer]
  return out + [(w, None) for w in active if not w.per_layer and not w.ctx.startswith("embed")]


def _check_table_matches(cfg: ModelConfig) -> None:
  """The table must name exactly the model's params with the model's shapes."""
  want = params_lib.abstract_params(cfg)
  have = {}
  for w, layer in _entries(cfg):
    if w.per_layer and cfg.scan_layers:
      have[_ctx_path(w, cfg, None)] = (cfg.num_hidden_layers, *w.ctx_shape(cfg))
    else:
      have[_ctx_path(w, cfg, layer)] = tuple(w.ctx_shape(cfg))
  got = {k: tuple(v.shape) for k, v in want.items()}
  if got != have:
    raise RuntimeError(f"ctxjax.hf.WEIGHTS does not match the model's parameters: "
                       f"{_diff(have, got)}")


def _diff(have: dict, want: dict) -> str:
  """'missing [...], unexpected [...], shape differences [(path, have, want)]'."""
  shapes = [(k, have[k], want[k]) for k in sorted(set(have) & set(want)) if have[k] != want[k]]
  return (f"missing {sorted(set(want) - set(have))}, unexpected {sorted(set(have) - set(want))}"
          f", shape differences {shapes}")


# --- config ----------------------------------------------------------------------------------

def _norm_rope(d: Mapping | None, top_theta) -> dict:
  d = dict(d or {})
  legacy = d.pop("type", None)
  d.setdefault("rope_type", legacy or "default")
  if top_theta is not None:
    d.setdefault("rope_theta", top_theta)
  return d


def _rope_from_hf(hf: Mapping, max_pos: int) -> tuple[float, dict | None]:
  """(rope_theta, ctxjax rope_scaling) from either HF spelling."""
  top_theta = hf.get("rope_theta")
  params, legacy = hf.get("rope_parameters"), hf.get("rope_scaling")
  for key, value in (("rope_parameters", params), ("rope_scaling", legacy)):
    if value is not None and not isinstance(value, Mapping):
      raise ValueError(f"config.json {key} must be a dict or null, got {value!r}")
    if value and any(isinstance(v, Mapping) for v in value.values()):
      raise ValueError(f"config.json {key} is nested per layer type ({sorted(value)}); "
                       "ctxjax supports one RoPE setting for all layers")
  if params and legacy and _norm_rope(params, top_theta) != _norm_rope(legacy, top_theta):
    raise ValueError(f"config.json has both rope_parameters {dict(params)} and rope_scaling "
                     f"{dict(legacy)} and they disagree; keep one (transformers >= 5 would use "
                     "rope_scaling, older releases only read rope_scaling)")
  rope = _norm_rope(legacy or params, None)
  theta = rope.pop("rope_theta", None)
  if theta is None:
    theta = 10000.0 if top_theta is None else top_theta
  elif top_theta is not None and float(top_theta) != float(theta):
    raise ValueError(f"config.json rope_theta={top_theta!r} disagrees with the rope dict's "
                     f"rope_theta={theta!r}")
  for source in (rope, hf):
    prf = source.pop("partial_rotary_factor", None) if source is rope else source.get(
        "partial_rotary_factor")
    if prf not in (None, 1, 1.0):
      raise ValueError(f"config.json partial_rotary_factor={prf!r}: ctxjax rotates the whole "
                       "head (only 1.0 is supported)")
  rope_type = rope["rope_type"]
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"config.json has unknown rope type {rope_type!r}; ctxjax supports "
                     f"{sorted(ROPE_TYPES)}")
  if rope_type in ("yarn", "llama3", "longrope"):
    # HF 5.23: a top-level original_max_position_embeddings (Phi-3 style) wins; else it
    # defaults to max_position_embeddings.
    top = hf.get("original_max_position_embeddings")
    inner = rope.get("original_max_position_embeddings")
    if top is not None and inner is not None and top != inner:
      raise ValueError(f"config.json original_max_position_embeddings={top} disagrees with "
                       f"the rope dict's original_max_position_embeddings={inner}")
    rope["original_max_position_embeddings"] = top or inner or max_pos
  if rope_type == "yarn" and rope.get("factor") is None:
    rope["factor"] = max_pos / rope["original_max_position_embeddings"]  # HF 5.23 fallback
  if rope_type == "default":
    if set(rope) != {"rope_type"}:
      raise ValueError(f"config.json rope type 'default' takes no parameters, got "
                       f"{sorted(set(rope) - {'rope_type'})}")
    return float(theta), None
  return float(theta), rope


def config_from_hf(hf_config: Mapping[str, Any]) -> dict:
  """A HF LLaMA-family config.json (dict) -> a ctxjax model-config dict (validated)."""
  hf = dict(hf_config)
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r} is not supported; ctxjax imports "
                     f"LLaMA-family models: {list(SUPPORTED_MODEL_TYPES)}")
  if model_type == "mistral" and hf.get("sliding_window") is not None:
    raise ValueError(f"config.json model_type='mistral' with sliding_window="
                     f"{hf['sliding_window']!r} is not supported (only sliding_window=null, "
                     "which is LLaMA)")
  for key, ok in (("hidden_act", ("silu", "swish", None)), ("attention_bias", (False, None)),
                  ("mlp_bias", (False, None))):
    if hf.get(key) not in ok:
      raise ValueError(f"config.json {key}={hf[key]!r} is not supported; valid: "
                       f"{[v for v in ok if v is not None]}")
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")
  missing = [k for k in required if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json is missing required key(s) {missing}")
  out = {k: hf[k] for k in required}
  for key, default in _HF_DEFAULTS.items():
    out[key] = hf[key] if hf.get(key) is not None else default
  out["num_key_value_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
  if hf.get("head_dim") is not None:
    out["head_dim"] = hf["head_dim"]
  else:
    out["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
  out["position_embedding_type"] = "rope"
  out["rope_theta"], out["rope_scaling"] = _rope_from_hf(hf, out["max_position_embeddings"])
  out["attention_pattern"] = {"kind": "causal"}
  dtype = hf.get("dtype") or hf.get("torch_dtype")
  if dtype not in (None, "auto"):
    if dtype not in DTYPES:
      raise ValueError(f"config.json dtype={dtype!r} is not supported; valid: {sorted(DTYPES)}")
    out["dtype"] = out["param_dtype"] = dtype
  model_config_from_dict(out)  # validate now, with ctxjax's messages
  return out


def _rope_to_hf(cfg: ModelConfig) -> tuple[float, dict]:
  """(rope_theta, HF rope dict without None values) for cfg."""
  rs = cfg.rope_scaling or {"rope_type": "default"}
  theta = cfg.rope_theta
  if rs["rope_type"] == "ntk":
    # Static NTK is plain RoPE with base theta * f^(d/(d-2)); HF 5.23 has no "ntk" type.
    d = cfg.head_dim
    theta = theta * float(rs["factor"]) ** (d / (d - 2))
    rs = {"rope_type": "default"}
  rope = {"rope_type": rs["rope_type"], "rope_theta": theta}
  rope.update({k: v for k, v in rs.items() if k != "rope_type" and v is not None})
  if rope["rope_type"] != "default":
    rope["type"] = rope["rope_type"]  # transformers < 4.45 reads rope_scaling["type"]
  return theta, rope


def hf_config_from(cfg: ModelConfig, token_ids: Mapping[str, int] | None = None) -> dict:
  """config.json content for `cfg` as a LlamaForCausalLM; ValueError for what it can't express.

  rope_parameters (transformers >= 5) and rope_scaling (< 5; when present it replaces
  rope_parameters on a 5.x load) are identical dicts; for plain RoPE rope_scaling is null
  (older releases reject a "default" rope_scaling) and the top-level rope_theta carries it.
  max_position_embeddings is the extended context; original_max_position_embeddings is also
  written top-level for the types that need it (Phi-3 style readers).
  """
  if cfg.position_embedding_type != "rope":
    raise ValueError(f"position_embedding_type={cfg.position_embedding_type!r} cannot be "
                     "exported: LlamaForCausalLM only expresses 'rope' (with rope_scaling)")
  if cfg.attention_pattern.kind != "causal":
    raise ValueError(f"attention_pattern={cfg.attention_pattern.kind!r} cannot be exported: "
                     "LlamaForCausalLM only expresses 'causal' attention")
  # LongLoRA's S2-Attn is training-only (full causal attention at inference): exportable.
  mode = getattr(cfg, "attention_mode", "standard")
  if mode not in EXPORTABLE_ATTENTION_MODES:
    raise ValueError(f"attention_mode={mode!r} cannot be exported: LlamaForCausalLM only "
                     f"expresses {list(EXPORTABLE_ATTENTION_MODES)} (full causal attention)")
  theta, rope = _rope_to_hf(cfg)
  out = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_key_value_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "initializer_range": cfg.initializer_range,
      "max_position_embeddings": cfg.max_position_embeddings,
      "rope_theta": theta,
      "rope_parameters": rope,
      "rope_scaling": dict(rope) if rope["rope_type"] != "default" else None,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "use_cache": True,
      "torch_dtype": cfg.param_dtype,
      "dtype": cfg.param_dtype,
      **dict(token_ids or DEFAULT_TOKEN_IDS),
  }
  if "original_max_position_embeddings" in rope:
    out["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
  return out


# --- load ------------------------------------------------------------------------------------

def _dtype_name(dtype, what: str) -> str | None:
  """"bfloat16" / jnp.bfloat16 / np.float32 ... -> the ctxjax dtype name (None stays None)."""
  if dtype is None or (dtype == "auto" and what == "dtype"):  # compute dtype may be "auto"
    return dtype
  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in DTYPES:
    raise ValueError(f"{what}={dtype!r}; valid choices: {sorted(DTYPES)}")
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
    _check_table_matches(cfg)

    # Check every header before reading any data.
    entries = _entries(cfg)
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
      for w in (w for w in WEIGHTS if w.when(cfg)):
        if w.per_layer and cfg.scan_layers:
          stacked = np.empty((cfg.num_hidden_layers, *w.ctx_shape(cfg)), np_dtype)
          for i in range(cfg.num_hidden_layers):
            stacked[i] = read(w, i)
          yield _ctx_path(w, cfg, None), stacked
          del stacked
        else:
          for i in (range(cfg.num_hidden_layers) if w.per_layer else [None]):
            yield _ctx_path(w, cfg, i), read(w, i)

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
    raise ValueError(f"variables do not match the model config: {_diff(got, want)}")
  np_dtype = _NP_DTYPES[dtype]
  out = []
  for w, layer in _entries(cfg):
    if w.per_layer and cfg.scan_layers:
      src, idx = flat[_ctx_path(w, cfg, None)], layer
    else:
      src, idx = flat[_ctx_path(w, cfg, layer)], None

    def thunk(w=w, src=src, idx=idx):
      x = src if idx is None else src[idx]
      return w.to_hf(np.asarray(jax.device_get(x)).astype(np_dtype, copy=False), cfg)

    shape = tuple(w.hf_shape(cfg))
    out.append((w.hf.format(i=layer), shape, math.prod(shape) * np_dtype.itemsize, thunk))
  return out


def save(model: Transformer, variables, path, *, overwrite: bool = False,
         tokenizer_model=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
         dtype: str | None = None, token_ids: Mapping[str, int] | None = None) -> None:
  """Write `variables` as a HF LlamaForCausalLM directory at `path`.

  Writes config.json (hf_config_from), generation_config.json, model.safetensors (or
  model-0000k-of-0000n.safetensors shards of at most max_shard_bytes + index) in `dtype`
  (default the model's param_dtype), and tokenizer.model when given. Everything is written
  into a temporary sibling directory and renamed into place; a non-empty `path` is an error
  unless overwrite=True. token_ids: bos/eos/pad ids for the configs (default: ctxjax's
  tokenizer, DEFAULT_TOKEN_IDS).
  """
  from safetensors.numpy import save_file  # noqa: PLC0415 (optional dependency)

  cfg = model.cfg
  if cfg.lora_rank or cfg.base_quantization != "none":  # LongLoRA / LongQLoRA: one plain kernel
    variables = {"params": params_lib.merge_lora(variables["params"], cfg)}
    model = Transformer(params_lib.base_config(cfg))
    cfg = model.cfg
  dtype = _dtype_name(dtype, "dtype") or cfg.param_dtype
  if not (isinstance(max_shard_bytes, int) and max_shard_bytes > 0):
    raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
  hf_config = hf_config_from(dataclasses.replace(cfg, param_dtype=dtype), token_ids)
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise FileExistsError(f"{path} exists and is not a directory")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it")
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


# LLaMA's sentencepiece pieces, used when tokenizer.model cannot be read.
_LLAMA_PIECES = {"bos_token_id": "<s>", "eos_token_id": "</s>", "pad_token_id": "<pad>",
                 "unk_token_id": "<unk>"}


def tokenizer_config(tokenizer_model, hf_config: Mapping, model_max_length: int) -> dict:
  """tokenizer_config.json for a sentencepiece tokenizer.model, so that
  `AutoTokenizer.from_pretrained(dir)` builds a LlamaTokenizer that tokenizes as sentencepiece
  does: the model's special tokens (pieces looked up by the config's bos/eos/pad ids), BOS
  added as ctxjax's packing does, and a dummy prefix space only if the model adds one
  (transformers' converter otherwise always adds it; ctxjax's tokenizers do not)."""
  ids = {k: hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  out = {"tokenizer_class": "LlamaTokenizer", "model_max_length": int(model_max_length),
         "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False}
  try:
    import sentencepiece as spm  # noqa: PLC0415
    from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415
    data = pathlib.Path(tokenizer_model).read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=data)  # RuntimeError if not a model
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    ids["unk_token_id"] = sp.unk_id()
    out["add_prefix_space"] = bool(proto.normalizer_spec.add_dummy_prefix)
    piece = lambda key, i: sp.id_to_piece(i)
  except (ImportError, RuntimeError):
    logging.warning("%s is not a readable sentencepiece model; tokenizer_config.json names "
                    "LLaMA's special tokens", tokenizer_model)
    ids["unk_token_id"] = 0
    piece = lambda key, i: _LLAMA_PIECES[key]
  for key, i in ids.items():
    if i is not None:
      out[key.replace("_id", "")] = piece(key, int(i))
  return out


def _write_json(path: pathlib.Path, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
