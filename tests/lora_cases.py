"""Shared pieces of the LoRA / quantization tests: a tiny config and random parameters drawn on
the host from the model's abstract shapes (no compiled init, which is slow on a busy CPU)."""
import jax.numpy as jnp
import numpy as np

from ctxjax.model import model_config_from_dict
from ctxjax.model import params as params_lib

# Contraction sizes 32 (hidden, heads*head_dim) and 64 (MLP): all divisible by the block.
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64, quant_block_size=16, dtype="float32")


def config(**overrides):
  return model_config_from_dict({**SIZES, **overrides})


def random_params(cfg, seed=0, std=0.1):
  """Normal(0, std) weights (lora_b included, so adapters matter), norm scales U(0.5, 1.5);
  integer (quantized) leaves are not drawn here — quantize a float tree instead."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, sds in sorted(params_lib.abstract_params(cfg).items()):
    if path.endswith("/scale"):
      x = rng.uniform(0.5, 1.5, sds.shape)
    else:
      x = rng.normal(0.0, std, sds.shape)
    out[path] = jnp.asarray(x.astype(sds.dtype))
  return params_lib.unflatten(out)


def tokens(batch=2, length=16, seed=0, vocab=64):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)
