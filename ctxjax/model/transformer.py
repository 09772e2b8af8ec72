"""The LLaMA-family decoder: embed -> N blocks -> final norm -> LM head.

`Transformer(cfg).apply(variables, tokens, positions, segment_ids)` returns float32-castable
logits [batch, length, vocab] in the compute dtype; with `cache=` (a kv_cache.KVCache) it
returns (logits, updated cache): a prefill from an empty cache, or one decode step. Positions and segment ids are data: packing,
PoSE, randomized positions, ring shards and kv-cache decoding all just pass them. When omitted
(`model.apply(variables, tokens)`, the Hugging Face-style call), one contiguous document per row
is assumed — decided here, at the boundary, never inside a layer.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctxjax.model import kv_cache, memory_model
from ctxjax.model.config import ModelConfig
from ctxjax.model.layers import Block, Projection, RMSNorm, matmul_2d
from ctxjax.positions import absolute, schemes
from ctxjax.positions.generators import contiguous_positions

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class _ScanBlock(nn.Module):
  """Adapter giving Block the (carry, x) -> (carry, y) signature nn.scan wants."""
  cfg: ModelConfig
  training: bool = False
  contiguous_positions: bool = False

  @nn.compact
  def __call__(self, x_BTE, positions_BT, segment_ids_BT, kv=None, plan=None):
    out = Block(self.cfg, self.training, contiguous_positions=self.contiguous_positions,
                name="layer")(x_BTE, positions_BT, segment_ids_BT, kv, plan)
    return (out, None) if kv is None else out


def _concrete(x):
  """x as numpy if its values are known now (eager call), else None (inside a trace)."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_inputs(cfg: ModelConfig, tokens, positions):
  """Boundary checks. Shapes always; values only when concrete (the trainer checks its batches
  on the host before they reach jit)."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
  if positions.shape != tokens.shape:
    raise ValueError(f"positions shape {positions.shape} != tokens shape {tokens.shape}")
  tokens_np, positions_np = _concrete(tokens), _concrete(positions)
  if tokens_np is not None:
    lo, hi = int(tokens_np.min()), int(tokens_np.max())
    if lo < 0 or hi >= cfg.vocab_size:
      raise ValueError(f"token ids must lie in [0, vocab_size={cfg.vocab_size}), "
                       f"got min {lo}, max {hi}")
  scheme = schemes.get_scheme(cfg.position_embedding_type)
  if scheme.absolute is not None and positions_np is not None:
    top = int(positions_np.max())
    if top >= cfg.max_position_embeddings:
      raise ValueError(f"{scheme.name} position table has max_position_embeddings="
                       f"{cfg.max_position_embeddings} rows; got position {top}")


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, train: bool = False,
               cache: kv_cache.KVCache | None = None, positions_contiguous: bool = False):
    """train=True selects training-only behaviour (LongLoRA's S2-Attn). With `cache`, returns
    (logits, cache): several tokens prefill an empty cache, one token per row decodes.
    positions_contiguous: the caller vouches that positions step by 1 within each segment, as
    packing makes them (`ctxjax.attention.attend`: lets `auto` run splash attention on a TPU;
    a batch that breaks the promise gets NaN outputs there). Implied without positions_BT."""
    cfg = self.cfg
    batch, length = tokens_BT.shape
    if positions_BT is None:
      positions_BT = contiguous_positions(batch, length)
      positions_contiguous = True
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((batch, length), jnp.int32)
    _check_inputs(cfg, tokens_BT, positions_BT)

    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype, name="embed_tokens",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")))
    x_BTE = embed(tokens_BT)
    scheme = schemes.get_scheme(cfg.position_embedding_type)
    if scheme.absolute == "sinusoidal":
      x_BTE = x_BTE + absolute.sinusoidal_embedding(
          positions_BT, cfg.hidden_size).astype(cfg.compute_dtype)
    elif scheme.absolute == "learned":
      table = self.param("embed_positions", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.initializer_range), (None, "embed")),
          (cfg.max_position_embeddings, cfg.hidden_size), cfg.weight_dtype)
      # mode="fill": a position past the table gives NaN, never a silently clamped row.
      x_BTE = x_BTE + jnp.take(table, positions_BT, axis=0, mode="fill",
                               fill_value=jnp.nan).astype(cfg.compute_dtype)

    if cfg.memory_kind != "none":  # memory layers: memory_model.py, memory_inference.py
      if cache is not None:
        raise ValueError(f"model.memory_kind={cfg.memory_kind!r} decodes window by window with "
                         "ctxjax.model.memory_inference, not with a kv cache")
      x_BTE = memory_model.decoder_layers(cfg, train, x_BTE, segment_ids_BT)
      return self._head(embed, x_BTE, frozen=cfg.memory_kind == "longmem")
    if cache is not None:
      x_BTE, cache = self._cached_layers(x_BTE, positions_BT, segment_ids_BT, cache)
      return self._head(embed, x_BTE), cache
    block = _ScanBlock if cfg.scan_layers else Block
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTE, _ = stack(cfg, train, contiguous_positions=positions_contiguous, name="layers")(
          x_BTE, positions_BT, segment_ids_BT)
    else:
      for i in range(cfg.num_hidden_layers):
        x_BTE = block(cfg, train, contiguous_positions=positions_contiguous,
                      name=f"layers_{i}")(x_BTE, positions_BT, segment_ids_BT)

    return self._head(embed, x_BTE)

  def _cached_layers(self, x_BTE, positions_BT, segment_ids_BT, cache):
    """The layers with a key/value cache: every layer writes the same slots (one plan)."""
    cfg, plan = self.cfg, kv_cache.plan(cache, positions_BT, segment_ids_BT)
    if cfg.scan_layers:
      stack = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                      length=cfg.num_hidden_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTE, (k, v) = stack(cfg, False, name="layers")(x_BTE, positions_BT, segment_ids_BT,
                                                       (cache.k, cache.v), plan)
    else:
      k, v = list(cache.k), list(cache.v)
      for i in range(cfg.num_hidden_layers):
        x_BTE, (k[i], v[i]) = Block(cfg, False, name=f"layers_{i}")(
            x_BTE, positions_BT, segment_ids_BT, (k[i], v[i]), plan)
      k, v = tuple(k), tuple(v)
    return x_BTE, kv_cache.updated(cache, plan, k, v)

  def _head(self, embed, x_BTE, frozen: bool = False):
    """Final norm and LM head; `frozen`: their parameters get no gradient (LongMem)."""
    cfg = self.cfg
    x_BTE = RMSNorm(cfg, frozen, name="norm")(x_BTE)
    if cfg.tie_word_embeddings:
      table_VE = embed.embedding.astype(cfg.compute_dtype)
      logits_BTV = matmul_2d(x_BTE, jax.lax.stop_gradient(table_VE).T if frozen else table_VE.T)
    else:
      logits_BTV = Projection(cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                              frozen=frozen, name="lm_head")(x_BTE)
    return nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))
