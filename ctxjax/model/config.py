"""The model's configuration: one frozen, validated record built from a ConfigDict.

Key names follow Hugging Face's `LlamaConfig` (hidden_size, num_attention_heads, rope_theta,
rope_scaling, max_position_embeddings, ...) so import/export is a renaming-free copy.
Everything is validated here, once, with messages that name the key and the valid choices.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from ctxjax.attention.patterns import Pattern, make_pattern
from ctxjax.model import lora, memory_config, quant
from ctxjax.positions import schemes
from ctxjax.positions.rope import validate_rope_scaling
from ctxjax.registry import Registry, unknown_choice

import jax

DTYPES: Registry = Registry("model.param_dtype")  # dtype name -> jnp dtype
for _name, _dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16),
                      ("float16", jnp.float16)):
  DTYPES.add(_name, _dtype)
COMPUTE_DTYPES = (*DTYPES, "auto")  # auto: bfloat16 on accelerators, float32 on CPU
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def _freeze(value):
  """Dicts/lists -> hashable tuples, so the config can be a Flax module attribute."""
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _thaw_rope(items):
  if items is None:
    return None
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in items}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 1024
  hidden_size: int = 256
  intermediate_size: int = 704
  num_hidden_layers: int = 4
  num_attention_heads: int = 4
  num_key_value_heads: int = 4
  head_dim: int = 64
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  max_position_embeddings: int = 2048
  # Positional scheme: one of ctxjax.positions.schemes.SCHEMES.
  position_embedding_type: str = "rope"
  rope_theta: float = 10000.0
  rope_scaling_items: Any = None  # frozen HF rope_scaling dict; read via .rope_scaling
  xpos_scale_base: float = 512.0
  xpos_gamma: float = 0.4
  # Attention: implementation (ctxjax.attention.IMPLEMENTATIONS) and pattern. "auto" = the
  # fastest exact kernel for each call (blockwise on CPU, cuDNN on GPU, splash on TPU for
  # packed training data: docs/pods.md); "reference" is the dense definition the others are
  # tested against.
  attention_impl: str = "auto"
  attention_pattern: Pattern = dataclasses.field(default_factory=lambda: make_pattern("causal"))
  # How q/k/v become output: ctxjax.model.attention_modes.MODES (standard, s2, dilated,
  # lm_infinite), with that mode's options.
  attention_mode: str = "standard"
  attention_options_items: Any = ()
  # Numerics and memory.
  dtype: str = "auto"         # compute dtype; "auto" = bfloat16 on GPU/TPU, float32 on CPU
  param_dtype: str = "float32"  # master weights
  scan_layers: bool = True
  remat_policy: str = "none"
  # Parameter-efficient fine-tuning (LongLoRA / LongQLoRA): lora.py, quant.py, params.py.
  lora_rank: int = 0            # 0 = no adapters
  lora_alpha: float = 16.0      # delta = (lora_alpha / lora_rank) * x A B
  lora_dropout: float = 0.0     # on the adapter input, training only
  lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
  base_quantization: str = "none"  # frozen base kernels stored as none | int8 | nf4
  quant_block_size: int = 64    # absmax block along the contraction dim
  # Memory layers (kNN memory / Focused Transformer / LongMem): memory_config.py, memory_layer.py.
  memory_kind: str = "none"
  memory_layers: tuple = ()
  memory_window: int = 256
  memory_size: int = 1024
  memory_neighbors: int = 0
  memory_cross_batch: int = 0
  memory_search: str = "exact"
  memory_recall_target: float = 0.95
  side_layers: int = 0
  side_memory_layer: int = -1

  @property
  def rope_scaling(self) -> dict | None:
    return _thaw_rope(self.rope_scaling_items)

  @property
  def attention_options(self) -> dict:
    return {k: v for k, v in self.attention_options_items}

  @property
  def compute_dtype(self):
    if self.dtype == "auto":
      return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def num_query_groups(self) -> int:
    return self.num_attention_heads // self.num_key_value_heads

  def to_dict(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out.pop("rope_scaling_items")
    out["rope_scaling"] = self.rope_scaling
    out.pop("attention_options_items")
    out["attention_options"] = {k: list(v) if isinstance(v, tuple) else v
                                for k, v in self.attention_options.items()}
    out["attention_pattern"] = self.attention_pattern.to_dict()
    out["lora_targets"] = list(self.lora_targets)
    out["memory_layers"] = list(self.memory_layers)
    return out


def _positive_int(cfg, key):
  value = cfg[key]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
  return value


def model_config_from_dict(cfg: Mapping[str, Any]) -> ModelConfig:
  """Validate a `config.model` mapping (ConfigDict or dict) and return a ModelConfig."""
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  known = {f.name for f in dataclasses.fields(ModelConfig)} - {"rope_scaling_items",
                                                                "attention_options_items"}
  known |= {"rope_scaling", "attention_options"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
  merged = {**ModelConfig().to_dict(), **cfg}

  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim",
              "max_position_embeddings"):
    _positive_int(merged, key)
  if merged["num_attention_heads"] % merged["num_key_value_heads"]:
    raise ValueError(
        f"model.num_attention_heads ({merged['num_attention_heads']}) must be divisible by "
        f"model.num_key_value_heads ({merged['num_key_value_heads']})")
  for key, valid in (("dtype", COMPUTE_DTYPES), ("param_dtype", DTYPES),
                     ("remat_policy", REMAT_POLICIES)):
    if merged[key] not in valid:
      raise ValueError(unknown_choice(f"model.{key}", merged[key], valid))
  if not merged["rope_theta"] > 0:
    raise ValueError(f"model.rope_theta must be > 0, got {merged['rope_theta']!r}")

  scheme = schemes.get_scheme(merged["position_embedding_type"])
  rope_scaling = merged.pop("rope_scaling")
  if scheme.uses_rope:
    rope_scaling = validate_rope_scaling(
        rope_scaling, head_dim=merged["head_dim"], rope_theta=merged["rope_theta"],
        max_position_embeddings=merged["max_position_embeddings"])
  elif rope_scaling not in (None, {}, {"rope_type": "default"}):
    raise ValueError(
        f"model.rope_scaling is set but model.position_embedding_type="
        f"{merged['position_embedding_type']!r} does not use RoPE")
  else:
    rope_scaling = None
  if scheme.rotary and merged["head_dim"] % 2:
    raise ValueError(f"model.head_dim must be even for {scheme.name}, got {merged['head_dim']}")

  from ctxjax import attention  # late import: attention registers kernels on import
  if merged["attention_impl"] not in attention.IMPLEMENTATIONS:
    raise ValueError(unknown_choice("model.attention_impl", merged["attention_impl"],
                                    attention.IMPLEMENTATIONS))
  pattern = merged["attention_pattern"]
  if not isinstance(pattern, Pattern):
    pattern = make_pattern(**dict(pattern))
  merged["attention_pattern"] = pattern
  from ctxjax.model.attention_modes import validate_mode
  options = validate_mode(merged["attention_mode"], merged.pop("attention_options") or {},
                          impl=merged["attention_impl"], scheme=scheme)
  merged["attention_options_items"] = tuple(sorted(options.items()))
  merged["rope_scaling_items"] = _freeze(rope_scaling)
  lora.validate(merged)
  quant.validate(merged)
  memory_config.validate(merged, scheme)
  for key in ("rope_theta", "rms_norm_eps", "initializer_range", "xpos_scale_base", "xpos_gamma"):
    merged[key] = float(merged[key])
  return ModelConfig(**merged)
