"""LongQLoRA's frozen base (Yang 2023; QLoRA, Dettmers et al. 2023): the block projections'
kernels stored quantized, dequantized on the fly to the compute dtype, LoRA on top (lora.py).
This module holds one kernel's formats and its parameters inside a `Projection` (layers.py);
whole parameter trees are quantized / dequantized in params.py. It imports nothing of
ctxjax.model.

Formats (`FORMATS`, chosen by model.base_quantization):
  int8  q = round(127 * w / absmax) in [-127, 127], w ~ q * absmax / 127 (LLM.int8's absmax
        scaling, per block): 1 byte per weight; error <= absmax / 254 per weight.
  nf4   QLoRA's 4-bit NormalFloat: w ~ absmax * NF4[q], q the nearest of 16 levels placed at
        quantiles of N(0, 1) (`nf4_codebook`); two codes per uint8, the first in the high
        nibble as bitsandbytes packs them: 0.5 byte per weight; error <= 0.152 * absmax (half
        the widest gap, between -1 and -0.696).
absmax is taken per block of `quant_block_size` weights along the kernel's flattened
contraction dims, one float32 per block and output column: bitsandbytes blocks a torch weight
[out, in] along `in`, so the blocks are the same. (No double quantization of the absmax: it
costs 32 / block_size bits per weight, 0.5 at block 64.)

Parameters of a quantized projection: `kernel_int8` (int8, the kernel's shape) or `kernel_nf4`
(uint8, the last contraction dim halved), named with the kernel's logical axes, and
`kernel_absmax` [blocks, out...]. Both are frozen: the forward pass reads them through
stop_gradient, and the trainable filter (ctxjax/train/trainable.py) never trains integer leaves.
lm_head and the embeddings stay float (bitsandbytes skips lm_head too).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctxjax import xla_options
from ctxjax.registry import Registry, unknown_choice

ABSMAX = "kernel_absmax"  # the parameter beside a quantized projection's codes (the only spelling)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace in float32: the first half counts up from start, the second half down from
  end (numpy's float64 linspace differs from it by an ulp, which moves one NF4 level)."""
  start, end, i = np.float32(start), np.float32(end), np.arange(n)
  step = (end - start) / np.float32(n - 1)
  up, down = start + step * i.astype(np.float32), end - step * (n - 1 - i).astype(np.float32)
  return np.where(i < n // 2, up, down).astype(np.float32)


def nf4_codebook() -> np.ndarray:
  """QLoRA's NF4 levels, built as bitsandbytes' create_normal_map(offset=0.9677083): 8 positive
  N(0,1) quantiles at linspace(offset, 0.5, 9)[:-1], 7 negative at linspace(offset, 0.5, 8)[:-1],
  and an exact 0, normalised to [-1, 1] (float32 steps, float64 quantiles, as the reference)."""
  offset, ppf = 0.9677083, statistics.NormalDist().inv_cdf
  pos = [ppf(float(p)) for p in _linspace_f32(offset, 0.5, 9)[:-1]]
  neg = [-ppf(float(p)) for p in _linspace_f32(offset, 0.5, 8)[:-1]]
  values = np.sort(np.asarray(pos + [0.0] + neg, np.float32))
  return values / values.max()


NF4 = nf4_codebook()
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2  # nearest level = how many midpoints lie below


# --- one kernel [in..., out...] <-> (codes, absmax [blocks, out...]) ---------------------------

def _blocks(w, n_in: int, block: int):
  """[in..., out...] -> [in / block, block, out] (blocks along the flattened contraction)."""
  size_in = math.prod(w.shape[:n_in])
  return w.reshape(size_in // block, block, -1)


def _absmax(blocks):
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  return absmax, jnp.where(absmax == 0, 1.0, absmax)[:, None, :]  # (stored, safe divisor)


def int8_quantize(w, n_in: int, block: int):
  blocks = _blocks(w.astype(jnp.float32), n_in, block)
  absmax, divisor = _absmax(blocks)
  codes = jnp.clip(jnp.round(blocks / divisor * 127.0), -127, 127).astype(jnp.int8)
  return codes.reshape(w.shape), absmax.reshape(-1, *w.shape[n_in:])


def int8_dequantize(codes, absmax, n_in: int, block: int):
  blocks = _blocks(codes, n_in, block).astype(jnp.float32)
  return (blocks * (absmax.reshape(absmax.shape[0], 1, -1) / 127.0)).reshape(codes.shape)


def pack_nibbles(idx):
  """uint8 codes [..., 2n, out] in 0..15 -> [..., n, out]: element 2j in the high nibble."""
  pairs = idx.astype(jnp.uint8).reshape(-1, 2, idx.shape[-1])
  return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed):
  """Inverse of pack_nibbles: [n, out] uint8 -> [2n, out] uint8 codes."""
  return jnp.stack([packed >> 4, packed & 0xF], axis=1).reshape(-1, packed.shape[-1])


def _nf4_shape(shape, n_in):
  """Kernel shape -> packed-codes shape (the last contraction dim halved)."""
  return (*shape[:n_in - 1], shape[n_in - 1] // 2, *shape[n_in:])


def nf4_quantize(w, n_in: int, block: int):
  blocks = _blocks(w.astype(jnp.float32), n_in, block)
  absmax, divisor = _absmax(blocks)
  idx = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), blocks / divisor, side="left")
  packed = pack_nibbles(idx.reshape(-1, idx.shape[-1]))
  return packed.reshape(_nf4_shape(w.shape, n_in)), absmax.reshape(-1, *w.shape[n_in:])


def nf4_dequantize(codes, absmax, n_in: int, block: int):
  shape = (*codes.shape[:n_in - 1], codes.shape[n_in - 1] * 2, *codes.shape[n_in:])
  idx = unpack_nibbles(codes.reshape(-1, math.prod(codes.shape[n_in:])))
  values = jnp.take(jnp.asarray(NF4), idx.astype(jnp.int32), axis=0)
  blocks = values.reshape(-1, block, values.shape[-1])
  return (blocks * absmax.reshape(absmax.shape[0], 1, -1)).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Format:
  name: str
  codes_name: str       # the parameter holding the codes
  dtype: np.dtype
  bits: int             # per weight
  quantize: Callable    # (w [in..., out...], n_in, block) -> (codes, absmax [blocks, out...])
  dequantize: Callable  # (codes, absmax, n_in, block) -> float32 [in..., out...]
  codes_shape: Callable = lambda shape, n_in: tuple(shape)


FORMATS: Registry[Format] = Registry("model.base_quantization")
FORMATS.add("int8", Format("int8", "kernel_int8", np.dtype(np.int8), 8, int8_quantize,
                           int8_dequantize))
FORMATS.add("nf4", Format("nf4", "kernel_nf4", np.dtype(np.uint8), 4, nf4_quantize,
                          nf4_dequantize, _nf4_shape))
CHOICES = ("none", *FORMATS)
# Names of the frozen quantized leaves (never trained, ctxjax/train/trainable.py).
FROZEN_PARAMS = (*(f.codes_name for f in FORMATS.values()), ABSMAX)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one projection's frozen kernel is stored: a format and its absmax block size."""
  format: Format
  block_size: int


def spec(cfg) -> QuantSpec | None:
  """The storage of a block projection's kernel under a model config (None: float)."""
  if cfg.base_quantization == "none":
    return None
  return QuantSpec(FORMATS.get(cfg.base_quantization), cfg.quant_block_size)


def validate(merged: dict) -> None:
  """Check base_quantization / quant_block_size of a model-config dict."""
  kind, block = merged["base_quantization"], merged["quant_block_size"]
  if kind not in CHOICES:
    raise ValueError(unknown_choice("model.base_quantization", kind, CHOICES))
  if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
    raise ValueError(f"model.quant_block_size must be a positive integer, got {block!r}")
  if kind == "none":
    return
  sizes = {"hidden_size": merged["hidden_size"], "intermediate_size": merged["intermediate_size"],
           "num_attention_heads * head_dim": merged["num_attention_heads"] * merged["head_dim"]}
  bad = {k: v for k, v in sizes.items() if v % block}
  if bad:
    raise ValueError(f"model.quant_block_size={block} must divide every projection's input "
                     f"size; it does not divide {bad}")
  if kind == "nf4" and (block % 2 or merged["head_dim"] % 2):
    raise ValueError(f"model.base_quantization='nf4' packs two codes per byte: "
                     f"quant_block_size ({block}) and head_dim ({merged['head_dim']}) must be even")


@functools.lru_cache(maxsize=None)
def jitted(kind: str, op: str, n_in: int, block: int, lead: int):
  """FORMATS[kind].quantize/dequantize for one kernel, vmapped over `lead` stacked axes and
  compiled once per signature (one kernel at a time keeps a large model's peak memory low)."""
  fn = functools.partial(getattr(FORMATS[kind], op), n_in=n_in, block=block)
  for _ in range(lead):
    fn = jax.vmap(fn)
  return xla_options.jit(fn)


# --- inside a Projection ---------------------------------------------------------------------

def frozen_kernel(module: nn.Module, spec: QuantSpec, init, kernel_shape: tuple, names: tuple,
                  n_in: int) -> jax.Array:
  """A projection's kernel stored as `spec` says (codes + absmax parameters of `module`),
  dequantized to float32, without gradient. On init a fresh random kernel is quantized."""
  fmt, block = spec.format, spec.block_size
  quantized = (None, None)
  if module.is_initializing():  # a fresh random kernel, quantized
    quantized = fmt.quantize(init(module.make_rng("params"), kernel_shape, jnp.float32), n_in,
                             block)
  codes = module.param(fmt.codes_name, nn.with_logical_partitioning(
      lambda _: quantized[0], names))
  absmax = module.param(ABSMAX, nn.with_logical_partitioning(
      lambda _: quantized[1], (None, *names[n_in:])))
  codes, absmax = jax.lax.stop_gradient(codes), jax.lax.stop_gradient(absmax)
  return fmt.dequantize(codes, absmax, n_in, block)
