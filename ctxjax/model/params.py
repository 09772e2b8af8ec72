"""Operations on whole parameter trees of `Transformer(cfg)`: the one flatten/unflatten
convention ('/'-joined paths such as `layers/layer/self_attn/q_proj/kernel`), the abstract
parameters (the one `jax.eval_shape(model.init)` site), LoRA merging (Hu et al. 2021) and
fresh adapters on a base, and a quantized base (QLoRA, Dettmers et al. 2023) written or read.

`merge_lora(params, cfg)` folds the adapters into the kernels (dequantizing a quantized base):
the result belongs to `base_config(cfg)`, a plain model that LlamaForCausalLM can load.
`init_from_base(base_params, cfg, rng)` goes the other way: a plain model's parameters (e.g.
imported from Hugging Face) become this config's: fresh adapters, the base quantized if asked.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctxjax import xla_options
from ctxjax.model import quant
from ctxjax.model.lora import ADAPTER_PARAMS, BLOCK_PROJECTIONS
from ctxjax.model.transformer import Transformer


def flatten(tree, prefix: str = "") -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested mapping."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    out.update(flatten(v, path + "/") if isinstance(v, Mapping) else {path: v})
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    *parents, name = path.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return out


def stacked_dims(cfg, path: str) -> int:
  """Leading stacked axes of a parameter: 1 under nn.scan's `layers/` (one slice per layer)."""
  return 1 if cfg.scan_layers and path.startswith("layers/") else 0


def unrolled(params, cfg) -> dict:
  """A `scan_layers` model's parameters as its unrolled twin's (`layers/layer/...` with a
  leading [num_hidden_layers] axis -> `layers_{i}/...`): the same values, a tree per layer."""
  out = {}
  for path, x in flatten(nn.meta.unbox(params)).items():
    if stacked_dims(cfg, path):
      rest = path[len("layers/layer/"):]
      out.update({f"layers_{i}/{rest}": x[i] for i in range(cfg.num_hidden_layers)})
    else:
      out[path] = x
  return unflatten(out)


def base_config(cfg):
  """`cfg` without adapters and with a float base: what `merge_lora`'s parameters belong to."""
  return dataclasses.replace(cfg, lora_rank=0, base_quantization="none")


@functools.lru_cache(maxsize=8)
def abstract_params(cfg) -> dict[str, jax.ShapeDtypeStruct]:
  """{'/'-path: ShapeDtypeStruct} of Transformer(cfg)'s parameters (nothing allocated)."""
  abstract = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 1), jnp.int32))
  return flatten(nn.meta.unbox(abstract["params"]))


def count(params, pattern: str = r".") -> int:
  """Number of scalars in the leaves whose '/'-path matches `pattern` (re.search)."""
  return sum(int(math.prod(x.shape)) for p, x in flatten(nn.meta.unbox(params)).items()
             if re.search(pattern, p))


def weight_bytes(params, pattern: Callable[[str], bool] = lambda path: True) -> int:
  """Bytes of the leaves whose '/'-path satisfies `pattern`."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for p, x in flatten(nn.meta.unbox(params)).items() if pattern(p))


# --- a quantized base --------------------------------------------------------------------------

def is_quantizable(cfg, path: str) -> bool:
  """Whether `path` is a float kernel that `cfg` stores quantized (codes + absmax)."""
  parts = path.split("/")
  return (cfg.base_quantization != "none" and len(parts) > 1 and parts[-1] == "kernel"
          and parts[-2] in BLOCK_PROJECTIONS)


def quantize_kernel(cfg, path: str, kernel) -> dict[str, jax.Array]:
  """One float block-projection kernel at `path` -> {codes path: codes, absmax path: absmax}."""
  module = path.rsplit("/", 1)[0]
  absmax = abstract_params(cfg).get(f"{module}/{quant.ABSMAX}")
  if absmax is None:
    raise ValueError(f"{path} is not a quantized projection of this model")
  fmt = quant.FORMATS.get(cfg.base_quantization)
  n_in = kernel.ndim - absmax.ndim + 1  # absmax is [lead..., blocks, out...]
  fn = quant.jitted(fmt.name, "quantize", n_in, cfg.quant_block_size, stacked_dims(cfg, path))
  codes, absmax = fn(jnp.asarray(kernel))
  return {f"{module}/{fmt.codes_name}": codes, f"{module}/{quant.ABSMAX}": absmax}


def quantize_params(params, cfg):
  """Float parameters (as a plain model has them) -> cfg's quantized layout: each block
  projection's `kernel` becomes codes + `kernel_absmax`; everything else passes through, as do
  trees that are already quantized. Identity when cfg.base_quantization is "none"."""
  if cfg.base_quantization == "none":
    return params
  out = {}
  for path, leaf in flatten(params).items():
    out.update(quantize_kernel(cfg, path, leaf) if is_quantizable(cfg, path) else {path: leaf})
  return unflatten(out)


def dequantize_params(params, cfg):
  """Inverse layout of quantize_params: codes + absmax -> a float32 `kernel`."""
  if cfg.base_quantization == "none":
    return params
  fmt = quant.FORMATS.get(cfg.base_quantization)
  out, flat = {}, flatten(params)
  for path, leaf in flat.items():
    module, name = path.rsplit("/", 1)
    if name == quant.ABSMAX:
      continue
    if name == fmt.codes_name:
      absmax = flat[f"{module}/{quant.ABSMAX}"]
      lead = stacked_dims(cfg, path)
      n_in = leaf.ndim - absmax.ndim + 1  # absmax is [lead..., blocks, out...]
      fn = quant.jitted(fmt.name, "dequantize", n_in, cfg.quant_block_size, lead)
      out[f"{module}/kernel"] = fn(leaf, absmax)
    else:
      out[path] = leaf
  return unflatten(out)


# --- LoRA adapters -----------------------------------------------------------------------------

def merge_lora(params, cfg):
  """Parameters of `base_config(cfg)`: a quantized base dequantized (float32) and every adapter
  folded in, kernel + (alpha / r) * A @ B (in float32, then the kernel's dtype)."""
  flat = flatten(dequantize_params(nn.meta.unbox(params), cfg))
  out = {}
  for path, leaf in flat.items():
    module, name = path.rsplit("/", 1)
    if name in ADAPTER_PARAMS:
      continue
    if name == "kernel" and f"{module}/lora_a" in flat:
      a, b = flat[f"{module}/lora_a"], flat[f"{module}/lora_b"]
      leaf = _merged(stacked_dims(cfg, path))(leaf, a, b, cfg.lora_alpha / cfg.lora_rank)
    out[path] = leaf
  return unflatten(out)


@functools.lru_cache(maxsize=None)
def _merged(lead: int):
  """jit of (kernel [lead..., in..., out...], A [lead..., in..., r], B [lead..., r, out...],
  scale) -> kernel + scale * A @ B, in float32, returned in the kernel's dtype."""
  def merge(w, a, b, s):
    delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1,
                          precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + s * delta).astype(w.dtype)
  for _ in range(lead):
    merge = jax.vmap(merge, in_axes=(0, 0, 0, None))
  return xla_options.jit(merge)


def init_from_base(base_params, cfg, rng) -> dict:
  """`base_config(cfg)` parameters (e.g. from ctxjax.hf.load) -> parameters of `cfg`: every
  base tensor kept (kernels quantized when cfg.base_quantization is set), adapters fresh
  (A uniform, B zero: the model's function is unchanged up to quantization). Nothing is
  initialised twice, so a large base never exists in memory as a random copy."""
  want = abstract_params(cfg)
  base = flatten(quantize_params(nn.meta.unbox(base_params), cfg))
  fresh = _fresh_a({p: s for p, s in want.items() if p.endswith("/lora_a")}, cfg, rng)
  out = {}
  for path, sds in want.items():
    if path in fresh:
      out[path] = fresh[path]
    elif path.endswith("/lora_b"):
      out[path] = jnp.asarray(np.zeros(sds.shape, sds.dtype))
    elif path in base and tuple(base[path].shape) == tuple(sds.shape):
      leaf = jnp.asarray(base[path])
      out[path] = leaf if leaf.dtype == sds.dtype else leaf.astype(sds.dtype)
    else:
      got = tuple(base[path].shape) if path in base else "missing"
      raise ValueError(f"base parameters do not fit the model: {path} wants {sds.shape}, "
                       f"got {got}")
  unused = sorted(set(base) - set(want))
  if unused:
    raise ValueError(f"base parameters the model has no place for: {unused[:8]}")
  return unflatten(out)


def _fresh_a(specs: dict, cfg, rng) -> dict:
  """Every lora_a drawn U(+-1/sqrt(fan_in)) (as lora.a_init) on the host: adapters are small,
  and no random kernels need compiling."""
  gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  out = {}
  for path, sds in sorted(specs.items()):
    bound = 1.0 / math.sqrt(math.prod(sds.shape[stacked_dims(cfg, path):-1]))
    out[path] = jnp.asarray(gen.uniform(-bound, bound, sds.shape).astype(sds.dtype))
  return out
