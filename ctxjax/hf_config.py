"""A Hugging Face LLaMA-family config.json <-> a ctxjax model config.

`config_from_hf` reads LlamaConfig's keys (and Mistral's without a sliding window) and checks
what ctxjax cannot express; `hf_config_from` writes a LlamaForCausalLM config. RoPE in both
spellings (rope_parameters / rope_theta + rope_scaling) is ctxjax/positions/rope_hf.py's.
"""
from __future__ import annotations

from typing import Any, Mapping

from ctxjax.model.config import DTYPES, ModelConfig, model_config_from_dict
from ctxjax.positions.rope_hf import hf_rope_entries, rope_from_hf
from ctxjax.registry import unknown_choice

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# ctxjax tokenizer special ids (ctxjax/data/tokenizer.py); the default for exported configs.
DEFAULT_TOKEN_IDS = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
EXPORTABLE_ATTENTION_MODES = ("standard", "s2")
# LlamaConfig defaults (transformers 5.23) for the optional keys.
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "initializer_range": 0.02,
                "max_position_embeddings": 2048}


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
  out["rope_theta"], out["rope_scaling"] = rope_from_hf(hf, out["max_position_embeddings"])
  out["attention_pattern"] = {"kind": "causal"}
  # The fastest kernel that computes the reference's result (blockwise on CPU, cuDNN on GPU,
  # splash on TPU; also ModelConfig's default), as transformers picks sdpa: the dense
  # reference holds a [T, T] score matrix per head; with it a 4K prefill took 3.7 s against
  # transformers' 0.49 s, with blockwise 0.56 s (benchmarks/README.md, "Decoding").
  out["attention_impl"] = "auto"
  dtype = hf.get("dtype") or hf.get("torch_dtype")
  if dtype not in (None, "auto"):
    if dtype not in DTYPES:
      raise ValueError(f"config.json: {unknown_choice('dtype', dtype, DTYPES)}")
    out["dtype"] = out["param_dtype"] = dtype
  model_config_from_dict(out)  # validate now, with ctxjax's messages
  return out


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
  return {
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
      **hf_rope_entries(cfg.rope_scaling, cfg.rope_theta, cfg.head_dim),
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "use_cache": True,
      "torch_dtype": cfg.param_dtype,
      "dtype": cfg.param_dtype,
      **dict(token_ids or DEFAULT_TOKEN_IDS),
  }
