"""Sharding from the config: mesh arithmetic, rule coverage, and sharded train steps equal to
one device on 8 fake CPU devices (subprocess: the device count is fixed at jax import)."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from ctxjax.model import Transformer, model_config_from_dict
from ctxjax.train import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shape_fills_one_auto_axis():
  cfg = dict(ici_data=-1, ici_fsdp=2, ici_context=2, ici_tensor=1)
  assert sharding.mesh_shape(cfg, 16) == ((4, 2, 2, 1), (1, 1, 1, 1))
  assert sharding.mesh_shape(dict(ici_data=1, ici_fsdp=-1, dcn_data=2), 16, num_slices=2) == (
      (1, 8, 1, 1), (2, 1, 1, 1))


@pytest.mark.parametrize("cfg, match", [
    (dict(ici_data=-1, ici_fsdp=-1), "at most one"),
    (dict(ici_data=3, ici_fsdp=1), "multiply to 3"),
    (dict(ici_data=-1, ici_fsdp=3), "do not divide"),
    (dict(ici_data=0), "positive integers"),
])
def test_bad_mesh_sizes_are_refused(cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(cfg, 8)


def test_rules_must_name_mesh_axes_and_cover_every_parameter():
  with pytest.raises(ValueError, match="mesh axes are"):
    sharding.logical_rules(dict(logical_axis_rules=[("embed", "model")]))
  cfg = model_config_from_dict(dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=16))
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                         jax.ShapeDtypeStruct((1, 8), "int32"))["params"]
  sharding.check_params_covered(boxed, sharding.DEFAULT_RULES)
  rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "mlp")
  with pytest.raises(ValueError, match=r"mlp.*no logical_axis_rules|logical axes \['mlp'\]"):
    sharding.check_params_covered(boxed, rules)


def test_batch_must_divide_the_mesh():
  mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(ici_data=-1)))
  sharding.check_batch_divisible(mesh, 3, 17)  # one device: anything goes
  with pytest.raises(ValueError, match="data.batch_size"):
    fake = type("M", (), {"shape": {"data": 2, "fsdp": 2, "context": 1, "tensor": 1}})
    sharding.check_batch_divisible(fake, 6, 16)
  with pytest.raises(ValueError, match="context axis"):
    fake = type("M", (), {"shape": {"data": 1, "fsdp": 1, "context": 4, "tensor": 1}})
    sharding.check_batch_divisible(fake, 1, 18)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["rope", "alibi"])
def test_sharded_train_steps_equal_one_device(scheme):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharding_worker.py"),
                         scheme], capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [(tuple(r["mesh"]), r["grad_accum_steps"]) for r in rows] == [
      ((8, 1, 1, 1), 1), ((2, 2, 2, 1), 1), ((1, 2, 2, 2), 1), ((1, 1, 8, 1), 1),
      ((2, 2, 2, 1), 2)]
  for r in rows:
    assert r["loss_err"] < 1e-5, r
    assert r["grad_err"] < 1e-5, r  # summed over the steps, max abs over every parameter
