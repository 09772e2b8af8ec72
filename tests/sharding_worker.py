"""Run in a subprocess with 8 fake CPU devices: sharded train steps vs one device.
Prints one JSON line per mesh: max abs differences of losses and of the final parameters."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0")  # fast compiles (conftest.py)
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ctxjax.model import Transformer, model_config_from_dict  # noqa: E402
from ctxjax.train import sharding  # noqa: E402
from ctxjax.train.step import init_state, make_train_step  # noqa: E402

B, T, STEPS = 8, 64, 3
MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=128, position_embedding_type=sys.argv[1] if len(
                 sys.argv) > 1 else "rope")
LR = 0.1  # plain SGD: parameter differences are LR x gradient differences (Adam would
          # amplify float-rounding noise in near-zero gradients and hide what is compared)
DATA = ml_collections.ConfigDict(dict(position_ids="data"))


def batches():
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    tokens = rng.integers(0, 64, (B, T + 1)).astype(np.int32)
    cut = rng.integers(8, T - 8)  # two packed documents per row, crossing context shards
    pos = np.concatenate([np.arange(cut), np.arange(T - cut)]).astype(np.int32)
    seg = np.concatenate([np.ones(cut), np.full(T - cut, 2)]).astype(np.int32)
    yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.tile(pos, (B, 1)), "segment_ids": np.tile(seg, (B, 1)),
           "loss_mask": np.ones((B, T), np.float32)}


def run(mesh_sizes, grad_accum_steps=1):
  model = Transformer(model_config_from_dict(MODEL))
  tx = optax.sgd(LR)
  if mesh_sizes is None:
    state, _ = init_state(model, tx, jax.random.PRNGKey(0), B, T)
    step = make_train_step(model, tx, DATA)
    place = lambda b: b
  else:
    cfg = {f"ici_{a}": s for a, s in zip(sharding.MESH_AXES, mesh_sizes)}
    mesh, rules = sharding.create_mesh(cfg), sharding.DEFAULT_RULES
    state, shardings = init_state(model, tx, jax.random.PRNGKey(0), B, T, mesh=mesh,
                                  rules=rules)
    step = make_train_step(model, tx, DATA, mesh=mesh, rules=rules, state_shardings=shardings,
                           grad_accum_steps=grad_accum_steps)
    shard = sharding.batch_sharding(mesh, rules)
    place = lambda b: {k: jax.make_array_from_process_local_data(shard, v) for k, v in b.items()}
    # Really sharded: the q projection is split over tensor, the embedding over fsdp.
    q_spec = state.params["layers"]["layer"]["self_attn"]["q_proj"]["kernel"].sharding.spec
    assert tuple(q_spec)[:3] == (None, "fsdp", "tensor"), q_spec
  losses = []
  for batch in batches():
    state, metrics = step(state, place(batch))
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.map(np.asarray, state.params)


base_losses, base_params = run(None)
# The last row: gradient accumulation (2 micro-batches of 4 rows) on a sharded mesh.
for sizes, accum in [((8, 1, 1, 1), 1), ((2, 2, 2, 1), 1), ((1, 2, 2, 2), 1), ((1, 1, 8, 1), 1),
                     ((2, 2, 2, 1), 2)]:
  losses, params = run(sizes, accum)
  param_err = max(float(np.max(np.abs(a - b)))
                  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params)))
  print(json.dumps({"mesh": sizes, "grad_accum_steps": accum, "losses": losses, "base_losses": base_losses,
                    "loss_err": max(abs(a - b) for a, b in zip(losses, base_losses)),
                    "grad_err": param_err / LR}), flush=True)
