"""Registry of positional schemes: how positions enter the model.

A scheme says three things, each optional: whether position embeddings are added to the token
embeddings (sinusoidal, learned), how queries and keys are rotated/scaled (RoPE and all its
scalings, xPos), and whether attention gets a distance bias (ALiBi). The model asks the scheme;
it never branches on the scheme's name. Adding a scheme = one `Scheme` registered here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from ctxjax.positions import alibi, rope, xpos
from ctxjax.registry import Registry

# (cfg, q_BTHD, k_BSKD, q_positions_BT, k_positions_BS, center=None) -> (q, k). `center` is
# xPos's decay centre: it cancels in every logit, but keys kept in a decoding cache and the
# queries that later read them must share one (RoPE has none and ignores it).
RotateFn = Callable


@dataclasses.dataclass(frozen=True)
class Scheme:
  name: str
  uses_rope: bool = False          # reads rope_theta / rope_scaling
  rotary: bool = False             # rotates q/k pairs: needs an even head_dim
  absolute: Optional[str] = None   # "sinusoidal" | "learned": added to the token embeddings
  rotate_qk: Optional[RotateFn] = None
  alibi: bool = False

  def alibi_slopes(self, num_heads: int) -> Optional[np.ndarray]:
    return alibi.alibi_slopes(num_heads) if self.alibi else None


SCHEMES: Registry[Scheme] = Registry("model.position_embedding_type")


def register_scheme(scheme: Scheme) -> Scheme:
  return SCHEMES.add(scheme.name, scheme)


def get_scheme(name: str) -> Scheme:
  return SCHEMES.get(name)


def _rotate_rope(cfg, q, k, q_positions, k_positions, center=None):
  del center
  # seq_len = max(position)+1 drives dynamic NTK and LongRoPE's short/long switch (as HF).
  inv_freq, attention_factor = rope.rope_inv_freq(
      cfg.rope_scaling, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
      max_position_embeddings=cfg.max_position_embeddings,
      seq_len=rope.rope_seq_len(k_positions))
  return (rope.apply_rope(q, q_positions, inv_freq, attention_factor),
          rope.apply_rope(k, k_positions, inv_freq, attention_factor))


def _rotate_xpos(cfg, q, k, q_positions, k_positions, center=None):
  inv_freq, _ = rope.rope_inv_freq(None, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                                   max_position_embeddings=cfg.max_position_embeddings)
  return xpos.apply_xpos(q, k, q_positions, k_positions, inv_freq=inv_freq,
                         scale_base=cfg.xpos_scale_base, gamma=cfg.xpos_gamma, center=center)


register_scheme(Scheme("rope", uses_rope=True, rotary=True, rotate_qk=_rotate_rope))
register_scheme(Scheme("xpos", rotary=True, rotate_qk=_rotate_xpos))
register_scheme(Scheme("alibi", alibi=True))
register_scheme(Scheme("sinusoidal", absolute="sinusoidal"))
register_scheme(Scheme("learned", absolute="learned"))
register_scheme(Scheme("none"))  # NoPE: causal masking alone carries order
