"""How a layer turns projected q/k/v into attention output: a registry of modes.

  standard     rotate q/k with the positional scheme, then `attend` with cfg.attention_pattern
               (causal, sliding_window, lambda, block_causal, attention_sinks, full, ...).
  s2           LongLoRA S2-Attn (Chen et al. 2024) while TRAINING — half the heads in groups of
               `group_size`, half in groups shifted by group_size/2 — and full causal attention
               at inference, as the paper prescribes. Options: group_size. Also on the
               context-parallel kernels (ring, all_gather): the groups are segment ids, data
               that travels with its tokens.
  dilated      LongNet dilated attention (Ding et al. 2023). Options: segment_lengths,
               dilation_rates (one per branch).
  lm_infinite  LM-Infinite (Han et al. 2024): Lambda mask with the distance ceiling — global
               keys unrotated, queries rotated by min(distance, n_local). Options: n_global,
               n_local.
  landmark     Landmark attention (Mohtashami & Jaggi 2023): grouped softmax in training, top-k
               block retrieval at inference (landmark_mode.py). Options: mem_freq, top_k,
               landmark_token_id.
Options come from `model.attention_options` (a dict); each mode validates its own keys.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from ctxjax import attention
from ctxjax.attention.dilated import dilated_attention
from ctxjax.attention.lm_infinite import lm_infinite_attention
from ctxjax.attention.s2 import s2_attention
from ctxjax.model import landmark_mode
from ctxjax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Mode:
  name: str
  run: Callable       # (cfg, scheme, q, k, v, positions, segment_ids, training) -> out
  options: dict       # option -> type, all required
  kernels: tuple = ("reference", "blockwise", "xla", "auto")
  takes_contiguous_positions: bool = False  # run(..., contiguous_positions=): see `run_mode`
  needs_rotary: bool = False
  allows_alibi: bool = True


MODES: Registry[Mode] = Registry("model.attention_mode")


def register_mode(mode: Mode) -> Mode:
  return MODES.add(mode.name, mode)


def _rotated(cfg, scheme, q, k, positions):
  if scheme.rotate_qk is None:
    return q, k
  return scheme.rotate_qk(cfg, q, k, positions, positions)


def _standard(cfg, scheme, q, k, v, positions, segment_ids, training,
              contiguous_positions=False):
  q, k = _rotated(cfg, scheme, q, k, positions)
  return attention.attend(q, k, v, q_positions=positions, k_positions=positions,
                          q_segment_ids=segment_ids, k_segment_ids=segment_ids,
                          pattern=cfg.attention_pattern,
                          alibi_slopes=scheme.alibi_slopes(cfg.num_attention_heads),
                          impl=cfg.attention_impl, contiguous_positions=contiguous_positions)


def _s2(cfg, scheme, q, k, v, positions, segment_ids, training, contiguous_positions=False):
  if not training:  # LongLoRA: S2 is a training-time approximation; inference is full attention
    return _standard(cfg, scheme, q, k, v, positions, segment_ids, training,
                     contiguous_positions)
  q, k = _rotated(cfg, scheme, q, k, positions)
  return s2_attention(q, k, v, positions=positions, segment_ids=segment_ids,
                      group_size=cfg.attention_options["group_size"], impl=cfg.attention_impl,
                      alibi_slopes=scheme.alibi_slopes(cfg.num_attention_heads))


def _dilated(cfg, scheme, q, k, v, positions, segment_ids, training):
  q, k = _rotated(cfg, scheme, q, k, positions)
  opts = cfg.attention_options
  return dilated_attention(q, k, v, positions=positions, segment_ids=segment_ids,
                           segment_lengths=tuple(opts["segment_lengths"]),
                           dilation_rates=tuple(opts["dilation_rates"]), impl=cfg.attention_impl)


def _lm_infinite(cfg, scheme, q, k, v, positions, segment_ids, training):
  opts = cfg.attention_options
  return lm_infinite_attention(q, k, v, positions=positions, segment_ids=segment_ids,
                               n_global=opts["n_global"], n_local=opts["n_local"],
                               rotate_qk=functools.partial(scheme.rotate_qk, cfg),
                               impl=cfg.attention_impl)


register_mode(Mode("standard", _standard, {}, kernels=(),  # every registered kernel
                   takes_contiguous_positions=True))
register_mode(Mode("s2", _s2, {"group_size": int},
                   kernels=("reference", "blockwise", "xla", "auto", "ring", "all_gather"),
                   takes_contiguous_positions=True))
register_mode(Mode("dilated", _dilated, {"segment_lengths": tuple, "dilation_rates": tuple},
                   kernels=("reference", "blockwise", "auto"), allows_alibi=False))
register_mode(Mode("lm_infinite", _lm_infinite, {"n_global": int, "n_local": int},
                   kernels=("reference", "blockwise", "auto"), needs_rotary=True,
                   allows_alibi=False))
register_mode(Mode("landmark", landmark_mode.run, landmark_mode.OPTIONS,
                   kernels=landmark_mode.KERNELS, allows_alibi=False))


def run_mode(cfg, scheme, q, k, v, positions, segment_ids, training, *,
             contiguous_positions: bool = False):
  """cfg.attention_mode's output. contiguous_positions: the caller's promise that positions step
  by 1 within each segment (`ctxjax.attention.attend`), handed to the modes that can use it."""
  mode = MODES[cfg.attention_mode]
  promise = ({"contiguous_positions": contiguous_positions}
             if mode.takes_contiguous_positions else {})
  return mode.run(cfg, scheme, q, k, v, positions, segment_ids, training, **promise)


def validate_mode(name: str, options: dict, *, impl: str, scheme) -> dict:
  """Check a mode and its options at the config boundary; returns the options."""
  mode = MODES.get(name)
  options = dict(options or {})
  missing = sorted(set(mode.options) - set(options))
  unknown = sorted(set(options) - set(mode.options))
  if missing or unknown:
    raise ValueError(f"model.attention_options for attention_mode={name!r} must have exactly "
                     f"the keys {sorted(mode.options)}; missing {missing}, unknown {unknown}")
  for key, kind in mode.options.items():
    value = options[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
      raise ValueError(f"model.attention_options.{key} must be a positive integer, got {value!r}")
    if kind is tuple:
      if not isinstance(value, (list, tuple)) or not value or any(
          not isinstance(x, int) or x <= 0 for x in value):
        raise ValueError(f"model.attention_options.{key} must be a non-empty list of positive "
                         f"integers, got {value!r}")
      options[key] = tuple(value)
  if name == "dilated" and len(options["segment_lengths"]) != len(options["dilation_rates"]):
    raise ValueError("model.attention_options.segment_lengths and dilation_rates must have the "
                     "same length (one (w, r) per branch)")
  if mode.kernels and impl not in mode.kernels:
    raise ValueError(f"model.attention_mode={name!r} runs on attention_impl in "
                     f"{list(mode.kernels)}, got {impl!r}")
  if mode.needs_rotary and scheme.rotate_qk is None:
    raise ValueError(f"model.attention_mode={name!r} needs a rotary position_embedding_type "
                     f"(rope or xpos), got {scheme.name!r}")
  if not mode.allows_alibi and scheme.alibi:
    raise ValueError(f"model.attention_mode={name!r} does not support ALiBi")
  return options
