"""Building blocks of the LLaMA-family decoder: RMSNorm, SwiGLU MLP, grouped-query attention.

Every parameter carries logical axis names (embed, mlp, heads, kv_heads, head_dim, vocab) and
the main activations are constrained with (batch, length, ...) names, so a sharding config can
map them onto a mesh without touching this file. Outside a logical-rules context the
constraints are no-ops.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctxjax.model import attention_modes, cached_attention, memory_layer
from ctxjax.model import lora as lora_lib
from ctxjax.model import quant as quant_lib
from ctxjax.model.config import ModelConfig
from ctxjax.positions import schemes


class RMSNorm(nn.Module):
  """Root-mean-square norm (Zhang & Sennrich 2019), statistics in float32 as LLaMA. `frozen`:
  the scale gets no gradient (LongMem's frozen head)."""
  cfg: ModelConfig
  frozen: bool = False

  @nn.compact
  def __call__(self, x_BTE):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x_BTE.shape[-1],), self.cfg.weight_dtype)
    scale = jax.lax.stop_gradient(scale) if self.frozen else scale
    x = x_BTE.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    scale_11E = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + scale.shape)
    return (x * scale_11E).astype(self.cfg.compute_dtype)


class Mlp(nn.Module):
  """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig
  training: bool = False

  @nn.compact
  def __call__(self, x_BTE):
    cfg, training = self.cfg, self.training
    e, m = cfg.hidden_size, cfg.intermediate_size
    proj = lambda name, shape, names: block_projection(cfg, name, shape, names,
                                                       training=training)
    gate_BTM = proj("gate_proj", (e, m), ("embed", "mlp"))(x_BTE)
    up_BTM = proj("up_proj", (e, m), ("embed", "mlp"))(x_BTE)
    h_BTM = nn.with_logical_constraint(nn.silu(gate_BTM) * up_BTM, ("batch", "length", "mlp"))
    return proj("down_proj", (m, e), ("mlp", "embed"))(h_BTM)


def matmul_2d(x, kernel, n_in: int = 1):
  """Contract x's last `n_in` dims with kernel's first `n_in`, as ONE 2-D matmul: [B*T, in] @
  [in, out]. XLA:CPU runs the backward of a 3-D dot (weight gradient contracting over batch and
  length) about 2x slower than the 2-D form (measured: SwiGLU MLP grad 121 ms -> 56 ms)."""
  lead, in_shape, out_shape = x.shape[:-n_in], kernel.shape[:n_in], kernel.shape[n_in:]
  y = x.reshape(-1, math.prod(in_shape)) @ kernel.reshape(math.prod(in_shape), -1)
  return y.reshape(*lead, *out_shape)


class Projection(nn.Module):
  """A bias-free linear map with an explicitly shaped, logically named kernel (flax's
  DenseGeneral inits kernels flat and reshapes, which breaks per-parameter sharding constraints
  under a mesh). The kernel's first `n_in` dims contract with x's last `n_in` dims. The kernel
  may be stored as a quantized frozen base (`quant`, quant.py) and carry a LoRA adapter
  (`lora`, lora.py); the caller decides both (`block_projection`), as MaxText hands
  DenseGeneral its `quant`. `frozen`: the kernel gets no gradient (LongMem's frozen head)."""
  cfg: ModelConfig
  kernel_shape: tuple[int, ...]
  names: tuple[str, ...]
  n_in: int = 1
  training: bool = False
  lora: lora_lib.LoraSpec | None = None
  quant: quant_lib.QuantSpec | None = None
  frozen: bool = False

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    shape, names, n_in = self.kernel_shape, self.names, self.n_in
    init = nn.initializers.normal(cfg.initializer_range)
    if self.quant is None:
      kernel = self.param("kernel", nn.with_logical_partitioning(init, names), shape,
                          cfg.weight_dtype)
    else:
      kernel = quant_lib.frozen_kernel(self, self.quant, init, shape, names, n_in)
    kernel = jax.lax.stop_gradient(kernel) if self.frozen else kernel
    y = matmul_2d(x.astype(dtype), kernel.astype(dtype), n_in)
    if self.lora is not None:  # + (alpha / r) * dropout(x) A B
      a, b = lora_lib.adapter(self, self.lora.rank, shape, names, n_in, cfg.weight_dtype)
      x = lora_lib.dropout(self, x, self.lora.dropout, self.training)
      h = matmul_2d(x.astype(dtype), a.astype(dtype), n_in)
      y = y + self.lora.scale * matmul_2d(h, b.astype(dtype))
    return y


def block_projection(cfg: ModelConfig, name: str, kernel_shape: tuple[int, ...],
                     names: tuple[str, ...], *, n_in: int = 1, training: bool = False
                     ) -> Projection:
  """The `Projection` called `name` inside a decoder block, with the adapter and the stored
  base that `cfg` gives it (model.lora_*, model.base_quantization)."""
  return Projection(cfg, kernel_shape, names, n_in=n_in, training=training, name=name,
                    lora=lora_lib.spec(cfg, name), quant=quant_lib.spec(cfg))


class Attention(nn.Module):
  """Grouped-query self-attention; positions and segment ids are inputs, the scheme, mode and
  kernel come from the config's registries. With a layer cache `kv` = (k, v) and the call's
  `plan` (kv_cache.py) it also returns the updated (k, v). `memory`: a memory layer
  (memory_layer.py; `source_kv` = the keys/values its memory stores, default its own);
  `return_kv`: also return this layer's unrotated (k, v) (LongMem's memory source);
  `contiguous_positions`: the caller vouches that positions step by 1 within each segment
  (`ctxjax.attention.attend`; lets `auto` run splash on a TPU)."""
  cfg: ModelConfig
  training: bool = False
  memory: bool = False
  return_kv: bool = False
  contiguous_positions: bool = False

  @nn.compact
  def __call__(self, x_BTE, positions_BT, segment_ids_BT, kv=None, plan=None, source_kv=None):
    cfg = self.cfg
    proj = lambda heads, names, name: block_projection(
        cfg, name, (cfg.hidden_size, heads, cfg.head_dim), names, training=self.training)
    q_BTHD = proj(cfg.num_attention_heads, ("embed", "heads", "head_dim"), "q_proj")(x_BTE)
    k_BTKD = proj(cfg.num_key_value_heads, ("embed", "kv_heads", "head_dim"), "k_proj")(x_BTE)
    v_BTKD = proj(cfg.num_key_value_heads, ("embed", "kv_heads", "head_dim"), "v_proj")(x_BTE)

    q_BTHD = nn.with_logical_constraint(q_BTHD, ("batch", "length", "heads", "head_dim"))
    k_BTKD = nn.with_logical_constraint(k_BTKD, ("batch", "length", "kv_heads", "head_dim"))
    v_BTKD = nn.with_logical_constraint(v_BTKD, ("batch", "length", "kv_heads", "head_dim"))
    # The mode rotates q/k with the positional scheme and runs the kernel (attention_modes.py).
    scheme = schemes.get_scheme(cfg.position_embedding_type)
    if self.memory:
      out_BTHD = memory_layer.memory_attention(self, cfg, scheme, q_BTHD, k_BTKD, v_BTKD,
                                               positions_BT, segment_ids_BT, self.training,
                                               source_kv)
    elif kv is None:
      out_BTHD = attention_modes.run_mode(cfg, scheme, q_BTHD, k_BTKD, v_BTKD, positions_BT,
                                          segment_ids_BT, self.training,
                                          contiguous_positions=self.contiguous_positions)
    else:
      out_BTHD, *kv = cached_attention.cached_attention(
          cfg, scheme, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, *kv, plan)
      kv = tuple(nn.with_logical_constraint(x, ("batch", "kv_heads", "length", "head_dim"))
                 for x in kv)
    out_BTHD = nn.with_logical_constraint(out_BTHD, ("batch", "length", "heads", "head_dim"))
    out_BTE = block_projection(cfg, "o_proj",
                               (cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size),
                               ("heads", "head_dim", "embed"), n_in=2,
                               training=self.training)(out_BTHD)
    if self.return_kv:
      return out_BTE, (k_BTKD, v_BTKD)
    return out_BTE if kv is None else (out_BTE, kv)


class Block(nn.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)). With a layer cache
  (kv, plan) it returns (x, updated kv); with `return_kv`, (x, its attention's (k, v));
  `contiguous_positions`: see Attention."""
  cfg: ModelConfig
  training: bool = False
  memory: bool = False
  return_kv: bool = False
  contiguous_positions: bool = False

  @nn.compact
  def __call__(self, x_BTE, positions_BT, segment_ids_BT, kv=None, plan=None, source_kv=None):
    x_BTE = nn.with_logical_constraint(x_BTE, ("batch", "length", "embed"))
    h = RMSNorm(self.cfg, name="input_layernorm")(x_BTE)
    attn = Attention(self.cfg, self.training, self.memory, self.return_kv,
                     self.contiguous_positions, name="self_attn")(
        h, positions_BT, segment_ids_BT, kv, plan, source_kv)
    attn, kv = (attn, None) if kv is None and not self.return_kv else attn
    x_BTE = x_BTE + attn
    h = RMSNorm(self.cfg, name="post_attention_layernorm")(x_BTE)
    x_BTE = x_BTE + Mlp(self.cfg, self.training, name="mlp")(h)
    x_BTE = nn.with_logical_constraint(x_BTE, ("batch", "length", "embed"))
    return x_BTE if kv is None else (x_BTE, kv)
