"""The Hugging Face LLaMA weight table: one row per parameter (ctxjax path, HF tensor name,
shapes, transform), used in both directions, for the scanned (`layers/layer/...`, leading layer
axis) and the unrolled (`layers_{i}/...`) layouts. ctxjax is rotate-half like HF, so q/k need
no permutation; only torch's [out, in] Linear layout is transposed and reshaped.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ctxjax.model import params as params_lib
from ctxjax.model.config import ModelConfig


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


def ctx_path(w: Weight, cfg: ModelConfig, layer: int | None) -> str:
  """Full ctxjax param path of `w` (for the stacked tensor when scanned, layer=None)."""
  if not w.per_layer:
    return w.ctx
  return f"layers/layer/{w.ctx}" if cfg.scan_layers else f"layers_{layer}/{w.ctx}"


def entries(cfg: ModelConfig):
  """(weight, layer or None) for every HF tensor of `cfg`, in HF order (layer-major)."""
  active = [w for w in WEIGHTS if w.when(cfg)]
  out = [(w, None) for w in active if not w.per_layer and w.ctx.startswith("embed")]
  for i in range(cfg.num_hidden_layers):
    out += [(w, i) for w in active if w.per_layer]
  return out + [(w, None) for w in active if not w.per_layer and not w.ctx.startswith("embed")]


def check_table_matches(cfg: ModelConfig) -> None:
  """The table must name exactly the model's params with the model's shapes."""
  want = params_lib.abstract_params(cfg)
  have = {}
  for w, layer in entries(cfg):
    if w.per_layer and cfg.scan_layers:
      have[ctx_path(w, cfg, None)] = (cfg.num_hidden_layers, *w.ctx_shape(cfg))
    else:
      have[ctx_path(w, cfg, layer)] = tuple(w.ctx_shape(cfg))
  got = {k: tuple(v.shape) for k, v in want.items()}
  if got != have:
    raise RuntimeError(f"ctxjax.hf.WEIGHTS does not match the model's parameters: "
                       f"{diff(have, got)}")


def diff(have: dict, want: dict) -> str:
  """'missing [...], unexpected [...], shape differences [(path, have, want)]'."""
  shapes = [(k, have[k], want[k]) for k in sorted(set(have) & set(want)) if have[k] != want[k]]
  return (f"missing {sorted(set(want) - set(have))}, unexpected {sorted(set(have) - set(want))}"
          f", shape differences {shapes}")
