"""Every shipped config loads, validates and describes a model whose shapes trace."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest
from ml_collections import config_flags  # noqa: F401  (the loader the CLI uses)
from ml_collections.config_flags import config_flags as _cf

from ctxjax.model import Transformer, model_config_from_dict
from ctxjax.train.sharding import MESH_AXES
from ctxjax.train.step import POSITION_IDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = {"tiny_rope_scaling.py": ["linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "abf"],
        "tiny_absolute.py": ["sinusoidal", "learned", "none"],
        "tiny_position_ids.py": ["pose", "randomized"],
        "tiny_attention.py": ["window", "lambda", "lm_infinite", "block_causal", "sinks", "s2",
                              "dilated"],
        "tiny_mixture.py": ["cut_short", "cut_long", "global_upsample", "per_source_upsample",
                            "upsample_sources"],
        "tiny_growlength.py": ["growlength", "fixed"]}


def _cases():
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.basename(path)
    if name.startswith("_"):
      continue
    for arg in ARGS.get(name, [None]):
      yield pytest.param(path, arg, id=f"{name}:{arg}" if arg else name)


def _load(path, arg):
  return _cf.ConfigFileFlagParser(name="config").parse(f"{path}:{arg}" if arg else path)


@pytest.mark.parametrize("path, arg", list(_cases()))
def test_config_validates_and_traces(path, arg):
  config = _load(path, arg)
  cfg = model_config_from_dict(config.model)
  assert config.data.position_ids in POSITION_IDS
  tokens = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32)
  # A one-device mesh with the trainer's axes: context-parallel recipes (attention_impl ring /
  # all_gather) look their axis up while tracing.
  mesh = jax.sharding.AbstractMesh((1, 1, 1, 1), MESH_AXES)
  with jax.sharding.use_abstract_mesh(mesh):
    logits = jax.eval_shape(lambda t: Transformer(cfg).init_with_output(
        jax.random.PRNGKey(0), t)[0], tokens)
  assert logits.shape == (config.data.batch_size, config.data.seq_len, cfg.vocab_size)


def test_scaling_configs_change_the_frequencies():
  from ctxjax.positions.rope import rope_inv_freq
  seen = set()
  for arg in ARGS["tiny_rope_scaling.py"]:
    cfg = model_config_from_dict(_load(os.path.join(ROOT, "configs", "tiny_rope_scaling.py"),
                                       arg).model)
    inv, _ = rope_inv_freq(cfg.rope_scaling, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                           max_position_embeddings=cfg.max_position_embeddings, seq_len=1024)
    seen.add(tuple(float(x) for x in inv))
  assert len(seen) == len(ARGS["tiny_rope_scaling.py"])  # each recipe is a different RoPE


def test_unknown_config_argument_names_the_choices():
  with pytest.raises(ValueError, match="valid choices"):
    _load(os.path.join(ROOT, "configs", "tiny_rope_scaling.py"), "warp")
