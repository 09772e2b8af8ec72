"""Every shipped config loads, validates and describes a model whose shapes trace."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest
from ml_collections import config_flags  # noqa: F401  (the loader the CLI uses)
from ml_collections.config_flags import config_flags as _cf

from ctxjax.model import Transformer, model_config_from_dict
from ctxjax.train.config import run_config
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
    if name.startswith("_") or name.startswith("study"):  # study plans: test below
      continue
    for arg in ARGS.get(name, [None]):
      yield pytest.param(path, arg, id=f"{name}:{arg}" if arg else name)


def _load(path, arg):
  return _cf.ConfigFileFlagParser(name="config").parse(f"{path}:{arg}" if arg else path)


@pytest.mark.parametrize("path, arg", list(_cases()))
def test_config_validates_and_traces(path, arg):
  config = _load(path, arg)
  run = run_config(config)  # every section parses into its typed dataclass
  assert run.data.position_ids in POSITION_IDS and run.train.steps >= 1
  cfg = model_config_from_dict(config.model)
  tokens = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32)
  # A one-device mesh with the trainer's axes: context-parallel recipes (attention_impl ring /
  # all_gather) look their axis up while tracing.
  mesh = jax.sharding.AbstractMesh((1, 1, 1, 1), MESH_AXES)
  with jax.sharding.use_abstract_mesh(mesh):
    logits = jax.eval_shape(lambda t: Transformer(cfg).init_with_output(
        jax.random.PRNGKey(0), t)[0], tokens)
  assert logits.shape == (config.data.batch_size, config.data.seq_len, cfg.vocab_size)


@pytest.mark.parametrize("name, arg", [("study.py", "quick"), ("study.py", "full"),
                                       ("study.py", "smoke"), ("study_llama2_7b.py", "")])
def test_study_plans_validate(name, arg):
  """Every training item of a study plan is a valid training config, and every zero-shot
  change a valid model config (a wrong rope_scaling key stopped an item of a real run)."""
  from ctxjax.study import __main__ as study_main
  from ctxjax.study import item, plan
  study = study_main.load_study_config(os.path.join(ROOT, "configs", name), arg)
  items = plan.build(study)
  for it in items:
    if it.kind == "train":
      cfg = item.train_config(study, it, "/study")
      run_config(cfg)
      model_config_from_dict(cfg.model)
    elif it.model_overrides:
      by_name = plan.by_name(items)  # the source run (a HF base: an extension's config)
      src = by_name.get(plan.train_name(it.source)) or by_name["train:extend_pi"]
      base = item.train_config(study, src, "/study")
      model_config_from_dict(dict(base.model.to_dict(), **it.model_overrides))


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


@pytest.mark.parametrize("key, value, match", [
    ("data", dict(bogus=1), r"unknown config key data.bogus; valid keys: \['batch_size'"),
    ("data", dict(seq_le=3), r"unknown config key data.seq_le; did you mean 'data.seq_len'\?"),
    ("data", dict(seq_len=-3), r"^data.seq_len must be a positive integer, got -3$"),
    ("data", dict(batch_size="8"), r"^data.batch_size must be an integer, got '8'$"),
    ("data", dict(name="demmo"), r"^data.name='demmo'; did you mean 'demo'\?"),
    ("data", dict(position_ids="pose", max_position_id=None),
     "data.max_position_id is required with data.position_ids='pose'"),
    ("train", dict(steps=-1), r"^train.steps must be a positive integer, got -1$"),
    ("train", dict(stepz=1), "did you mean 'train.steps'"),
    ("optim", dict(schedule="cosin"), r"^optim.schedule='cosin'; did you mean 'cosine'\?"),
    ("optim", dict(learning_rate=0.0), r"^optim.learning_rate must be > 0, got 0.0$"),
    ("mesh", dict(ici_dat=2), "did you mean 'mesh.ici_data'"),
    ("data", dict(mixture=dict(kind="cut_short", long_shar=0.5)),
     "unknown config key data.mixture.long_shar; did you mean 'data.mixture.long_share'"),
])
def test_bad_keys_and_values_name_the_key(key, value, match):
  config = _load(os.path.join(ROOT, "configs", "tiny.py"), None).to_dict()  # any value type
  config[key].update(value)
  with pytest.raises(ValueError, match=match):
    run_config(config)


def test_unknown_section_and_defaults_written_once():
  config = _load(os.path.join(ROOT, "configs", "tiny.py"), None)
  run = run_config(config)
  assert (run.data.num_threads, run.train.grad_accum_steps, run.optim.trainable) == (2, 1, ())
  config = {**config.to_dict(), "bogus": 1}
  with pytest.raises(ValueError, match=r"unknown config key bogus; valid keys: \['aot'"):
    run_config(config)
