"""LoRA adapters on the block projections (Hu et al. 2021), and merging them away for export.

  y = x W + (lora_alpha / lora_rank) * dropout(x) A B

A [in..., r] starts as PEFT's kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)); B [r, out...]
starts at zero, so a fresh adapter leaves the model exactly unchanged. A and B sit beside the
kernel (`lora_a`, `lora_b`), named with the kernel's logical axes (the rank axis is replicated),
so they shard with the rules that shard the kernel. Dropout hits the adapter input only, and
only when training (PEFT).

LongLoRA (Chen et al. 2024, fine-tune.py): r 8, alpha 16, dropout 0 on q,k,v,o, with the
embeddings and norms also trained (optim.trainable, ctxjax/train/trainable.py) and S2-Attn.
LongQLoRA (Yang 2023): LoRA on every block projection over a frozen NF4 base (quant.py).

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
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Every dense matmul inside a decoder block (layers.py); lm_head stays a plain kernel, as in
# PEFT's and bitsandbytes' defaults.
BLOCK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj")
ADAPTER_PARAMS = ("lora_a", "lora_b")


def validate(merged: dict) -> None:
  """Check the lora_* keys of a model-config dict in place (lora_targets becomes a tuple)."""
  rank = merged["lora_rank"]
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise ValueError(f"model.lora_rank must be an integer >= 0 (0 = no LoRA), got {rank!r}")
  alpha = merged["lora_alpha"]
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"model.lora_alpha must be a number > 0, got {alpha!r}")
  dropout = merged["lora_dropout"]
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise ValueError(f"model.lora_dropout must lie in [0, 1), got {dropout!r}")
  targets = merged["lora_targets"]
  if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
    raise ValueError(f"model.lora_targets must be a list of projection names, got {targets!r}; "
                     f"valid choices: {list(BLOCK_PROJECTIONS)}")
  unknown = [t for t in targets if t not in BLOCK_PROJECTIONS]
  if unknown or len(set(targets)) != len(targets) or (rank and not targets):
    raise ValueError(f"model.lora_targets={list(targets)}: each must be one of "
                     f"{list(BLOCK_PROJECTIONS)}, without repeats, and at least one when "
                     f"lora_rank > 0 (unknown: {unknown})")
  merged["lora_alpha"], merged["lora_dropout"] = float(alpha), float(dropout)
  merged["lora_targets"] = tuple(t for t in BLOCK_PROJECTIONS if t in targets)  # canonical order


def applies(cfg, name: str) -> bool:
  """Whether the projection called `name` carries an adapter under `cfg`."""
  return cfg.lora_rank > 0 and name in cfg.lora_targets


def scale(cfg) -> float:
  return cfg.lora_alpha / cfg.lora_rank


def _a_init(n_in: int):
  """PEFT's kaiming_uniform_(a=sqrt(5)) on torch's [r, in] lora_A: bound sqrt(6 / ((1 + 5) *
  fan_in)) = 1/sqrt(fan_in); here A is [in..., r], fan_in = prod(in...)."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                          in_axis=tuple(range(n_in)), out_axis=-1)


def adapter(module) -> tuple[jax.Array, jax.Array]:
  """(lora_a [in..., r], lora_b [r, out...]) of a `Projection` module (created on init)."""
  cfg, n_in = module.cfg, module.n_in
  shape, names, r = module.kernel_shape, module.names, cfg.lora_rank
  a = module.param("lora_a", nn.with_logical_partitioning(_a_init(n_in), (*names[:n_in], None)),
                   (*shape[:n_in], r), cfg.weight_dtype)
  b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (None, *names[n_in:])),
                   (r, *shape[n_in:]), cfg.weight_dtype)
  return a, b


def dropout(module, x, training: bool):
  """Inverted dropout of the adapter input with rate model.lora_dropout, training only."""
  rate = module.cfg.lora_dropout
  if not training or rate == 0:
    return x
  if not module.has_rng("dropout"):
    raise ValueError(f"model.lora_dropout={rate} needs a 'dropout' PRNG key when training: "
                     "model.apply(..., train=True, rngs={'dropout': key})")
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# --- whole parameter trees --------------------------------------------------------------------

def base_config(cfg):
  """`cfg` without adapters and with a float base: what `merge_lora`'s parameters belong to."""
  return dataclasses.replace(cfg, lora_rank=0, base_quantization="none")


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


@functools.lru_cache(maxsize=8)
def abstract_params(cfg) -> dict:
  """{'/'-path: ShapeDtypeStruct} of Transformer(cfg)'s parameters (nothing allocated)."""
  from ctxjax.model.transformer import Transformer  # noqa: PLC0415 (transformer imports layers)
  abstract = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 1), jnp.int32))
  return flatten(nn.meta.unbox(abstract["params"]))


def merge_lora(params, cfg):
  """Parameters of `base_config(cfg)`: a quantized base dequantized (float32) and every adapter
  folded in, kernel + (alpha / r) * A @ B (in float32, then the kernel's dtype)."""
  from ctxjax.model import quant  # noqa: PLC0415 (quant imports this module)
  flat = flatten(quant.dequantize_params(nn.meta.unbox(params), cfg))
  out = {}
  for path, leaf in flat.items():
    module, name = path.rsplit("/", 1)
    if name in ADAPTER_PARAMS:
      continue
    if name == "kernel" and f"{module}/lora_a" in flat:
      a, b = flat[f"{module}/lora_a"], flat[f"{module}/lora_b"]
      leaf = _merged(stacked_dims(cfg, path))(leaf, a, b, scale(cfg))
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
  return jax.jit(merge)


def init_from_base(base_params, cfg, rng) -> dict:
  """`base_config(cfg)` parameters (e.g. from ctxjax.hf.load) -> parameters of `cfg`: every
  base tensor kept (kernels quantized when cfg.base_quantization is set), adapters fresh
  (A uniform, B zero: the model's function is unchanged up to quantization). Nothing is
  initialised twice, so a large base never exists in memory as a random copy."""
  from ctxjax.model import quant  # noqa: PLC0415
  want = abstract_params(cfg)
  base = flatten(quant.quantize_params(nn.meta.unbox(base_params), cfg))
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
  """Every lora_a drawn U(+-1/sqrt(fan_in)) (as `_a_init`) on the host: adapters are small,
  and no random kernels need compiling."""
  gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  out = {}
  for path, sds in sorted(specs.items()):
    bound = 1.0 / math.sqrt(math.prod(sds.shape[stacked_dims(cfg, path):-1]))
    out[path] = jnp.asarray(gen.uniform(-bound, bound, sds.shape).astype(sds.dtype))
  return out


def count(params, pattern: str = r".") -> int:
  """Number of scalars in the leaves whose '/'-path matches `pattern` (re.search)."""
  return sum(int(math.prod(x.shape)) for p, x in flatten(nn.meta.unbox(params)).items()
             if re.search(pattern, p))
