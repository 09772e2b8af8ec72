"""RoPE settings <-> a Hugging Face config.json, beside the rope types (rope.py), as Levanter
keeps from_hf_config / to_hf_config with each RoPE type.

HF spells the same setting two ways: transformers >= 5 `rope_parameters` (with rope_theta
inside), < 5 a top-level `rope_theta` + `rope_scaling` with "type" (< 4.45) or "rope_type".
`rope_from_hf` reads both (they must agree when both are present); `rope_to_hf` writes one dict
that serves as both, so old and new releases load the same RoPE (parity target: transformers
5.23, `modeling_rope_utils`).
"""
from __future__ import annotations

from typing import Mapping

from ctxjax.positions.rope import ROPE_TYPES
from ctxjax.registry import unknown_choice

# Types whose frequencies depend on the pre-extension context length.
_NEED_ORIGINAL = ("yarn", "llama3", "longrope")


def _norm_rope(d: Mapping | None, top_theta) -> dict:
  d = dict(d or {})
  legacy = d.pop("type", None)
  d.setdefault("rope_type", legacy or "default")
  if top_theta is not None:
    d.setdefault("rope_theta", top_theta)
  return d


def rope_from_hf(hf: Mapping, max_pos: int) -> tuple[float, dict | None]:
  """(rope_theta, ctxjax rope_scaling or None for plain RoPE) from a config.json dict, in
  either spelling; `max_pos` is its max_position_embeddings (HF's fallback for the original
  context length and the YaRN factor)."""
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
    raise ValueError(f"config.json has an unknown rope type: "
                     f"{unknown_choice('rope_type', rope_type, ROPE_TYPES)}")
  if rope_type in _NEED_ORIGINAL:
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


def rope_to_hf(rope_scaling: dict | None, rope_theta: float, head_dim: int
               ) -> tuple[float, dict]:
  """(top-level rope_theta, HF rope dict without None values) for a ctxjax RoPE setting."""
  rs = rope_scaling or {"rope_type": "default"}
  theta = rope_theta
  if rs["rope_type"] == "ntk":
    # Static NTK (bloc97 2023) is plain RoPE with base theta * f^(d/(d-2)); HF 5.23 has no
    # "ntk" type.
    theta = theta * float(rs["factor"]) ** (head_dim / (head_dim - 2))
    rs = {"rope_type": "default"}
  rope = {"rope_type": rs["rope_type"], "rope_theta": theta}
  rope.update({k: v for k, v in rs.items() if k != "rope_type" and v is not None})
  if rope["rope_type"] != "default":
    rope["type"] = rope["rope_type"]  # transformers < 4.45 reads rope_scaling["type"]
  return theta, rope


def hf_rope_entries(rope_scaling: dict | None, rope_theta: float, head_dim: int) -> dict:
  """The config.json keys that carry RoPE: rope_theta, rope_parameters (>= 5) and rope_scaling
  (< 5; when present a 5.x load uses it instead) as identical dicts — rope_scaling is null
  for plain RoPE, which older releases reject as a dict — and a top-level
  original_max_position_embeddings for the types that need one (Phi-3 style readers)."""
  theta, rope = rope_to_hf(rope_scaling, rope_theta, head_dim)
  out = {"rope_theta": theta, "rope_parameters": rope,
         "rope_scaling": dict(rope) if rope["rope_type"] != "default" else None}
  if "original_max_position_embeddings" in rope:
    out["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
  return out
