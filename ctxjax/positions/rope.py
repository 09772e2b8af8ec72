"""Rotary position embeddings (RoPE) and the HF-compatible RoPE scaling family.

Parity target: HF transformers 5.23 (`modeling_rope_utils.ROPE_INIT_FUNCTIONS` and the
Llama rotary class for "default"); each type cites its paper. The translation to and from a HF
config.json is rope_hf.py's.

Frequency tables follow HF's float32 arithmetic step by step (pow, then `1.0 / x`, each
rounded to float32; products and sums in HF's order), so they equal HF's tables bit for bit
where torch's pow is correctly rounded (its scalar libm path, head_dim < 64 on AVX-512
CPUs); torch's vectorised pow (larger heads) can differ by 1 ulp on a few entries. A 1-ulp
inv_freq difference moves angles by ~p * 2^-24 rad, which grows with the position p, so
long-context logit parity with HF needs HF's rounding, not a more exact table. Static tables
are computed on the host with numpy; only "dynamic" and "longrope" depend on the sequence
length, which may be a traced scalar, so they use jnp ops on it.

Layout is rotate-half (HF / GPT-NeoX): dimension i is paired with i + head_dim/2.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ctxjax.registry import Registry

# (params, head_dim, rope_theta, max_position_embeddings, seq_len) -> (inv_freq [d/2], af [])
RopeFn = Callable[..., tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RopeInit:
  """One registered rope type: its compute function and its config schema."""

  name: str
  fn: RopeFn
  required: tuple[str, ...]  # keys that must be present (besides rope_type)
  defaults: Mapping[str, Any]  # optional keys -> default (None: optional, no default)
  # check(params, head_dim=, rope_theta=, max_position_embeddings=): raises ValueError; may
  # normalise params in place (they are validate_rope_scaling's private copy).
  check: Callable[..., None] | None = None
  uses_seq_len: bool = False


ROPE_TYPES: Registry[RopeInit] = Registry("model.rope_scaling.rope_type")


def register_rope_type(
  name: str,
  *,
  required: tuple[str, ...] = (),
  defaults: Mapping[str, Any] | None = None,
  check: Callable[..., None] | None = None,
  uses_seq_len: bool = False,
) -> Callable[[RopeFn], RopeFn]:
  """Decorator adding a compute function to ROPE_TYPES under `name`."""

  def deco(fn: RopeFn) -> RopeFn:
    ROPE_TYPES.add(name, RopeInit(name, fn, tuple(required), dict(defaults or {}), check,
                                  uses_seq_len))
    return fn

  return deco


# --- helpers


def _exponents(head_dim: int) -> np.ndarray:
  """float32 [d/2]: 2i/d as HF computes it (float32 arange / d)."""
  return np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)


def _pow_f32(base: float, expo: np.ndarray) -> np.ndarray:
  """float32 base**expo as torch's float32 pow (libm powf): the float32 operands' exact
  float64 power, rounded once."""
  return (np.float64(np.float32(base)) ** expo.astype(np.float64)).astype(np.float32)


def _recip(x: np.ndarray) -> np.ndarray:
  """float32 1/x (torch's `1.0 / t` is reciprocal(t) * 1.0)."""
  return np.float32(1.0) / x


def _base_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """float32 [d/2]: 1 / theta^(2i/d) in HF's float32 arithmetic."""
  return _recip(_pow_f32(theta, _exponents(head_dim)))


def _out(inv_freq_half: np.ndarray | jax.Array, attention_factor: float | jax.Array = 1.0):
  return jnp.asarray(inv_freq_half, jnp.float32), jnp.asarray(attention_factor, jnp.float32)


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _require_positive(params: dict, key: str) -> None:
  v = params[key]
  if not (_is_number(v) and math.isfinite(v) and v > 0):
    raise ValueError(f"rope_scaling[{key!r}] must be a positive number, got {v!r}")


def _require_positive_int(params: dict, key: str) -> None:
  v = params[key]
  if not (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0):
    raise ValueError(f"rope_scaling[{key!r}] must be a positive integer, got {v!r}")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# --- validators


def _check_factor(p: dict, **_) -> None:
  _require_positive(p, "factor")


def _check_ntk(p: dict, *, head_dim: int, **_) -> None:
  _require_positive(p, "factor")
  if head_dim <= 2:  # the NTK exponent d/(d-2) needs d > 2
    raise ValueError(f"head_dim must be > 2 for NTK scaling, got {head_dim}")


def _check_yarn(p: dict, **_) -> None:
  _require_positive(p, "factor")
  # HF reads the betas as `x or default`, so 0 / None mean 32 / 1.
  p["beta_fast"] = p["beta_fast"] or 32.0
  p["beta_slow"] = p["beta_slow"] or 1.0
  _require_positive_int(p, "original_max_position_embeddings")
  for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
    if p.get(key) is not None and not _is_number(p[key]):
      raise ValueError(f"rope_scaling[{key!r}] must be a number or None, got {p[key]!r}")
  if p.get("attention_factor") is not None:
    _require_positive(p, "attention_factor")
  if not isinstance(p["truncate"], (bool, np.bool_)):  # HF reads None as False: refuse it
    raise ValueError(f"rope_scaling['truncate'] must be True or False, got {p['truncate']!r}")


def _check_llama3(p: dict, **_) -> None:
  _require_positive(p, "factor")
  _require_positive_int(p, "original_max_position_embeddings")
  _require_positive(p, "low_freq_factor")
  _require_positive(p, "high_freq_factor")
  if p["high_freq_factor"] <= p["low_freq_factor"]:  # else the smoothing ramp divides by <= 0
    raise ValueError(
      f"rope_scaling['high_freq_factor'] ({p['high_freq_factor']}) must be > "
      f"rope_scaling['low_freq_factor'] ({p['low_freq_factor']})"
    )


def _check_longrope(p: dict, *, head_dim: int, **_) -> None:
  _require_positive_int(p, "original_max_position_embeddings")
  for key in ("short_factor", "long_factor"):
    v = p[key]
    if not (isinstance(v, (list, tuple, np.ndarray)) and len(v) == head_dim // 2):
      n = len(v) if hasattr(v, "__len__") else type(v).__name__
      raise ValueError(f"rope_scaling[{key!r}] must be a list of head_dim//2 = {head_dim // 2} "
                       f"positive numbers, got {n}")
    if not all(_is_number(x) and x > 0 for x in v):
      raise ValueError(f"rope_scaling[{key!r}] entries must be positive numbers")
  for key in ("factor", "attention_factor"):
    if p.get(key) is not None:
      _require_positive(p, key)


# --- rope types


@register_rope_type("default")
def _default(p, *, head_dim, rope_theta, max_position_embeddings, seq_len):
  """Plain RoPE, Su et al. 2021 (RoFormer); ABF = the same with a larger rope_theta."""
  return _out(_base_inv_freq(head_dim, rope_theta))


@register_rope_type("linear", required=("factor",), check=_check_factor)
def _linear(p, *, head_dim, rope_theta, max_position_embeddings, seq_len):
  """Position interpolation, Chen et al. 2023: m -> m/f, i.e. inv_freq / f."""
  return _out(_base_inv_freq(head_dim, rope_theta) / np.float32(p["factor"]))


@register_rope_type("ntk", required=("factor",), check=_check_ntk)
def _ntk(p, *, head_dim, rope_theta, max_position_embeddings, seq_len):
  """Static NTK-aware scaling, bloc97 (2023): base b * f^(d/(d-2)); not in HF 5.23."""
  base = rope_theta * p["factor"] ** (head_dim / (head_dim - 2))
  return _out(_base_inv_freq(head_dim, base))


@register_rope_type("dynamic", required=("factor",), check=_check_ntk, uses_seq_len=True)
def _dynamic(p, *, head_dim, rope_theta, max_position_embeddings, seq_len):
  """Dynamic NTK, emozilla (2023): NTK base from S = max(seq_len, max_position_embeddings)."""
  inv0 = _base_inv_freq(head_dim, rope_theta)
  if seq_len is None:  # HF init: S = max_position_embeddings, i.e. the unscaled base
    return _out(inv0)
  # HF's forward recomputes only when seq_len grows past max_position_embeddings, then
  # base' = b * (f * S / Lmax - (f - 1))^(d/(d-2)) and inv = 1 / base'^(2i/d), all in float32.
  f32 = jnp.float32
  seq_len = jnp.asarray(seq_len)
  s_len = jnp.maximum(seq_len, max_position_embeddings).astype(f32)
  ratio = f32(p["factor"]) * s_len / f32(max_position_embeddings) - f32(p["factor"] - 1.0)
  # torch raises the float32 ratio to the float64 exponent d/(d-2); split it as
  # c_hi + c_lo (float32) and use ratio^c_lo ~= 1 + c_lo*ln(ratio): base' is then within
  # 1 ulp of HF's (equal in most cases), where a float32 exponent alone is usually 1 ulp off.
  c = head_dim / (head_dim - 2)
  c_hi = np.float32(c)
  c_lo = np.float32(c - np.float64(c_hi))
  pow_hi = ratio ** c_hi
  base = f32(rope_theta) * (pow_hi + pow_hi * (c_lo * jnp.log(ratio)))
  inv = f32(1.0) / base ** jnp.asarray(_exponents(head_dim))
  return _out(jnp.where(seq_len > max_position_embeddings, inv, jnp.asarray(inv0)))


@register_rope_type(
  "yarn",
  required=("factor", "original_max_position_embeddings"),
  defaults={
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": True,
    "attention_factor": None,
    "mscale": None,
    "mscale_all_dim": None,
  },
  check=_check_yarn,
)
def _yarn(p, *, head_dim, rope_theta, max_position_embeddings, seq_len):
  """YaRN, Peng et al. 2023: NTK-by-parts ramp between inv and inv/f, plus mscale on cos/sin."""
  d, f, L = head_dim, float(p["factor"]), p["original_max_position_embeddings"]
  # HF 5.23: explicit attention_factor wins; else mscale ratio if both truthy; else mscale(f).
  af = p.get("attention_factor")
  if af is None:
    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    af = _yarn_mscale(f, m) / _yarn_mscale(f, m_all) if (m and m_all) else _yarn_mscale(f)

  def corr_dim(n_rot: float) -> float:  # pair index whose wavelength fits n_rot times in L
    return d * math.log(L / (n_rot * 2 * math.pi)) / (2 * math.log(rope_theta))

  low, high = corr_dim(p["beta_fast"]), corr_dim(p["beta_slow"])
  if p["truncate"]:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)  # HF clamps high to d-1, not d/2-1
  if low == high:
    high += 0.001  # HF's guard against a zero-width ramp
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low))
                 / np.float32(high - low), np.float32(0), np.float32(1))
  pos_freqs = _pow_f32(rope_theta, _exponents(d))
  extrapolation = _recip(pos_freqs)
  interpolation = _recip(np.float32(f) * pos_freqs)
  # ramp 0 (high frequencies): keep (extrapolate); ramp 1 (low frequencies): inv/f (interpolate).
  keep = np.float32(1) - ramp  # HF's extrapolation factor (1 - (1 - ramp) need not be ramp)
  return _out(interpolation * (np.float32(1) - keep) + extrapolation * keep, af)


@register_rope_type(
  "llama3",
  required=("factor", "original_max_position_embeddings"),
  defaults={"low_freq_factor": 1.0, "high_freq_factor": 4.0},
  check=_check_llama3,
)
def _llama3(p, *, head_dim, rope_theta, max_position_embeddings, seq_len):
  """Llama 3.1 (Meta 2024): keep short wavelengths, divide long ones by f, smooth in between."""
  f, L = float(p["factor"]), p["original_max_position_embeddings"]
  lff, hff = float(p["low_freq_factor"]), float(p["high_freq_factor"])
  inv = _base_inv_freq(head_dim, rope_theta)
  f32 = np.float32
  wavelen = _recip(inv) * f32(2 * math.pi)  # torch: c / t is reciprocal(t) * c
  # 1 at wavelen = L/hff, 0 at wavelen = L/lff
  smooth = (_recip(wavelen) * f32(L) - f32(lff)) / f32(hff - lff)
  smoothed = (f32(1) - smooth) * inv / f32(f) + smooth * inv
  long_wave, short_wave = wavelen > f32(L / lff), wavelen < f32(L / hff)
  out = np.where(long_wave, inv / f32(f), np.where(short_wave, inv, smoothed))
  return _out(out)


@register_rope_type(
  "longrope",
  required=("short_factor", "long_factor", "original_max_position_embeddings"),
  defaults={"factor": None, "attention_factor": None},
  check=_check_longrope,
  uses_seq_len=True,
)
def _longrope(p, *, head_dim, rope_theta, max_position_embeddings, seq_len):
  """LongRoPE, Ding et al. 2024 (Phi-3): per-pair rescale, long_factor iff seq_len > original."""
  L = p["original_max_position_embeddings"]
  # HF 5.23: explicit factor wins, else the max_pos / original ratio (Phi-3 style configs).
  f = p["factor"] if p.get("factor") is not None else max_position_embeddings / L
  af = p.get("attention_factor")
  if af is None:
    af = math.sqrt(1 + math.log(f) / math.log(L)) if f > 1.0 else 1.0
  pow_theta = _pow_f32(rope_theta, _exponents(head_dim))
  short = _recip(np.asarray(p["short_factor"], np.float32) * pow_theta)
  if seq_len is None:  # HF init uses the short factors
    return _out(short, af)
  long = _recip(np.asarray(p["long_factor"], np.float32) * pow_theta)
  # One switch for all positions (HF dynamic_rope_update); seq_len may be traced.
  use_long = jnp.asarray(seq_len) > L
  inv_F = jnp.where(use_long, jnp.asarray(long, jnp.float32), jnp.asarray(short, jnp.float32))
  return _out(inv_F, af)


# --- public API


def validate_rope_scaling(rope_scaling: dict | None, *, head_dim: int, rope_theta: float,
                          max_position_embeddings: int) -> dict | None:
  """Validate a HF-style rope_scaling / rope_parameters dict; return a normalised copy.

  The result always has "rope_type" (legacy "type" is folded in) and the type's defaults;
  a "rope_theta" key is accepted if it equals `rope_theta` and is dropped (the argument is
  the single source of truth). None stays None (plain RoPE). Raises ValueError naming the key.
  """
  if not (isinstance(head_dim, numbers.Integral) and head_dim > 0 and head_dim % 2 == 0):
    raise ValueError(f"head_dim must be a positive even integer (rotary pairs), got {head_dim!r}")
  if not (_is_number(rope_theta) and math.isfinite(rope_theta) and rope_theta > 0):
    raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")
  if not (isinstance(max_position_embeddings, numbers.Integral) and max_position_embeddings > 0):
    raise ValueError(
      f"max_position_embeddings must be a positive integer, got {max_position_embeddings!r}")
  if rope_scaling is None:
    return None
  if not isinstance(rope_scaling, Mapping):
    raise ValueError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")

  p = dict(rope_scaling)
  legacy = p.pop("type", None)
  if legacy is not None and p.get("rope_type", legacy) != legacy:
    raise ValueError(f"rope_scaling has conflicting 'type' ({legacy!r}) and "
                     f"'rope_type' ({p['rope_type']!r})")
  rope_type = p.pop("rope_type", legacy) or "default"
  spec = ROPE_TYPES.get(rope_type)

  theta_in = p.pop("rope_theta", None)
  if theta_in is not None and theta_in != rope_theta:
    raise ValueError(
      f"rope_scaling['rope_theta'] = {theta_in!r} disagrees with rope_theta = {rope_theta!r}")

  allowed = set(spec.required) | set(spec.defaults)
  unknown = sorted(set(p) - allowed)
  if unknown:
    raise ValueError(f"unknown rope_scaling key(s) {unknown} for rope_type {rope_type!r}; "
                     f"valid keys: {sorted(allowed)}")
  missing = [k for k in spec.required if p.get(k) is None]
  if missing:
    raise ValueError(
      f"rope_scaling is missing required key(s) {missing} for rope_type {rope_type!r}")

  for key, default in spec.defaults.items():
    p.setdefault(key, default)
  if spec.check is not None:
    spec.check(p, head_dim=head_dim, rope_theta=rope_theta,
               max_position_embeddings=max_position_embeddings)
  return {"rope_type": rope_type, **p}


def rope_inv_freq(rope_scaling: dict | None, *, head_dim: int, rope_theta: float,
                  max_position_embeddings: int, seq_len: int | jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """(inv_freq float32 [head_dim//2], attention_factor float32 []) as in HF transformers 5.23.

  seq_len = max(position_ids)+1 (see rope_seq_len); may be traced. Only "dynamic" and
  "longrope" read it; None means HF's init-time values (unscaled base / short factors).
  """
  p = validate_rope_scaling(rope_scaling, head_dim=head_dim, rope_theta=rope_theta,
                            max_position_embeddings=max_position_embeddings)
  p = p or {"rope_type": "default"}
  return ROPE_TYPES[p["rope_type"]].fn(
    p, head_dim=int(head_dim), rope_theta=float(rope_theta),
    max_position_embeddings=int(max_position_embeddings), seq_len=seq_len)


def rope_seq_len(positions_BT: jax.Array) -> jax.Array:
  """int32 []: max(positions)+1, the seq_len HF's dynamic/longrope update uses."""
  return jnp.max(positions_BT).astype(jnp.int32) + 1


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array,
               attention_factor: float | jax.Array = 1.0) -> jax.Array:
  """Rotate-half RoPE on x [B, T, H, D]; cos and sin both carry attention_factor (logits x af^2)."""
  half = x_BTHD.shape[-1] // 2
  if inv_freq.shape != (half,):
    raise ValueError(f"inv_freq shape {inv_freq.shape} != (head_dim//2,) = ({half},)")
  # Angles in float32: bf16 positions are exact only up to 256.
  inv_freq_11F = inv_freq.astype(jnp.float32).reshape((1,) * positions_BT.ndim + (half,))
  angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq_11F
  af = jnp.asarray(attention_factor, jnp.float32)
  cos_BT1F = (jnp.cos(angles_BTF) * af)[:, :, None, :]
  sin_BT1F = (jnp.sin(angles_BTF) * af)[:, :, None, :]
  x = x_BTHD.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  # [x1, x2] * cos + [-x2, x1] * sin, with cos/sin = concat(theta, theta)
  out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], -1)
  return out.astype(x_BTHD.dtype)
