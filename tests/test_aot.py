"""AOT pod checks (ctxjax/aot.py): TPU product names, the shipped pod/GPU recipes, and small
compiles on fake CPU devices and (when libtpu is installed) a TPU topology."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from ml_collections.config_flags import config_flags as _cf

from ctxjax import aot
from ctxjax.model.config import model_config_from_dict
from ctxjax.model.flops import train_flops_per_token
from ctxjax.train import sharding
from ctxjax.train import stages as stages_lib
from ctxjax.train import topology as topo
from ctxjax.train.config import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("llama2_7b_80k.py", "llama2_13b_64k.py", "lwm_1m.py", "llama2_7b_8xh100.py",
           "llama2_7b_8xh100.py:ring")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _load(name):
  """configs/<name>, where name may carry the config's argument: "file.py:arg"."""
  return _cf.ConfigFileFlagParser(name="config").parse(os.path.join(ROOT, "configs", name))


# ---------------------------------------------------------------------------------------------
# Topology names
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, libtpu, chips", [
    # v4 / v5p: N TensorCores = N/2 chips; grids as MaxText's accelerator_to_spec_map.
    ("v4-8", "v4:2x2x1", 4), ("v4-32", "v4:2x2x4", 16), ("v4-128", "v4:4x4x4", 64),
    ("v4-384", "v4:4x4x12", 192), ("v4-4096", "v4:8x16x16", 2048),
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-64", "v5p:2x4x4", 32), ("v5p-128", "v5p:4x4x4", 64),
    ("v5p-256", "v5p:4x4x8", 128), ("v5p-768", "v5p:4x8x12", 384),
    ("v5p-1152", "v5p:4x12x12", 576), ("v5p-3072", "v5p:8x12x16", 1536),
    ("v5p-6912", "v5p:12x12x24", 3456), ("v5p-17920", "v5p:16x20x28", 8960),
    # v5e / v6e: N chips.
    ("v5e-1", "v5e:1x1", 1), ("v5e-8", "v5e:2x4", 8), ("v5litepod-16", "v5e:4x4", 16),
    ("v5e-256", "v5e:16x16", 256), ("v6e-4", "v6e:2x2", 4), ("v6e-128", "v6e:8x16", 128),
])
def test_topology_names(name, libtpu, chips):
  t = topo.parse_topology(name)
  assert (t.libtpu_topology, t.num_chips) == (libtpu, chips)


def test_chip_specs():
  gib = 1024 ** 3
  assert {g: (c.hbm_bytes / gib, c.peak_flops / 1e12) for g, c in topo.CHIPS.items()} == {
      "v4": (32, 275), "v5e": (16, 197), "v5p": (95, 459), "v6e": (32, 918)}


@pytest.mark.parametrize("name, message", [
    ("v7-8", "not a TPU product name"), ("v5p128", "not a TPU product name"),
    ("v5p-100", "no v5p slice has 100 TensorCores"), ("v5p-7", "no v5p slice has 7"),
    ("v5e-2", "no v5e slice has 2 chips"), ("v6e-512", "no v6e slice has 512 chips"),
])
def test_unknown_topology_lists_valid_names(name, message):
  with pytest.raises(ValueError, match=message) as err:
    topo.parse_topology(name)
  assert "v5p-128" in str(err.value) and "v5e-16" in str(err.value)


def test_cli_target_errors():
  config = _load("llama2_7b_80k.py")
  with pytest.raises(ValueError, match="valid names"):
    aot.run(config, topology="v9-64", devices=None, stage=None, mfu=0.4)
  with pytest.raises(ValueError, match="exactly one of --topology"):
    aot.run(config, topology="v5p-8", devices="cpu:8", stage=None, mfu=0.4)
  with pytest.raises(ValueError, match="cpu:N"):
    aot.parse_devices("gpu:8")
  with pytest.raises(ValueError, match="valid choices"):
    _load("llama2_7b_8xh100.py:tpu")
  with pytest.raises(ValueError, match=r"stages 0\.\.4"):
    aot.run(_load("lwm_1m.py"), topology=None, devices=None, stage=5, mfu=0.4)


# ---------------------------------------------------------------------------------------------
# The recipes: configs validate, stages resolve, meshes fill the target, batches divide
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RECIPES)
def test_recipe_fits_its_mesh(name):
  config = _load(name)
  topology, devices = aot.choose_target(config, None, None)
  count = topo.parse_topology(topology).num_chips if topology else aot.parse_devices(devices)
  ici, dcn = sharding.mesh_shape(config.mesh, count)
  assert math.prod(ici) * math.prod(dcn) == count
  sizes = dict(zip(sharding.MESH_AXES, ici))
  rows = sizes["data"] * sizes["fsdp"]
  accum = run_config(config).train.grad_accum_steps
  for stage in stages_lib.resolve_stages(config):
    model = model_config_from_dict({**config.model.to_dict(), **stage.model_overrides})
    assert model.scan_layers and model.dtype == "bfloat16"
    assert stage.batch_size % (rows * accum) == 0, (stage, rows, accum)
    assert stage.seq_len % sizes["context"] == 0
    assert model.max_position_embeddings >= stage.seq_len
    if sizes["context"] > 1:
      assert model.attention_impl == "ring"


def test_fu_et_al_recipes():
  """Fu et al. 2024: constant LR 2e-5, ~4M tokens per step, >= 5B tokens in as few steps."""
  for name, seq_len in (("llama2_7b_80k.py", 81920), ("llama2_13b_64k.py", 65536),
                        ("llama2_7b_8xh100.py", 81920), ("llama2_7b_8xh100.py:ring", 81920)):
    config = _load(name)
    tokens = config.data.batch_size * config.data.seq_len
    assert config.data.seq_len == seq_len and 3.9e6 <= tokens <= 4.2e6
    assert (config.optim.schedule, config.optim.learning_rate) == ("constant", 2e-5)
    assert config.train.steps * tokens >= 5e9 > (config.train.steps - 1) * tokens
    assert config.data.mixture.kind == "per_source_upsample"
    assert config.data.mixture.target_context == seq_len
    assert config.train.init_from_hf


def test_lwm_stages():
  stages = stages_lib.resolve_stages(_load("lwm_1m.py"))
  assert [s.seq_len for s in stages] == [2 ** k for k in (15, 17, 18, 19, 20)]
  assert {s.seq_len * s.batch_size for s in stages} == {4 * 2 ** 20}
  assert [s.model_overrides["rope_theta"] for s in stages] == [1e6, 1e7, 1e7, 2.5e7, 5e7]


# ---------------------------------------------------------------------------------------------
# Compiles (subprocesses: the device count is fixed when a JAX backend starts)
# ---------------------------------------------------------------------------------------------

TINY = ["--config=configs/tiny.py", "--config.model.scan_layers=True",
        "--config.model.num_hidden_layers=2", "--config.model.hidden_size=64",
        "--config.model.intermediate_size=128", "--config.model.num_attention_heads=2",
        "--config.model.num_key_value_heads=2", "--config.model.head_dim=32",
        "--config.model.attention_impl=ring", "--config.mesh.ici_data=1",
        "--config.mesh.ici_fsdp=2", "--config.mesh.ici_context=2", "--config.data.seq_len=64",
        "--config.data.batch_size=4", "--mfu=0.5"]


def _aot(args, tmp_path):
  out = tmp_path / "aot.json"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, "-m", "ctxjax.aot", *args, f"--json={out}"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  reports = json.loads(out.read_text()) if out.exists() else None
  return proc, reports


def _tiny_flops():
  config = _load("tiny.py")
  config.model.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32)
  return train_flops_per_token(model_config_from_dict(config.model), 64) * 4 * 64


def test_tiny_compile_on_fake_cpu_devices(tmp_path):
  proc, reports = _aot(TINY + ["--devices=cpu:4"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  [r] = reports
  assert r["mesh"] == {"data": 1, "fsdp": 2, "context": 2, "tensor": 1}
  assert (r["devices"], r["attention_impl"], r["fits"]) == (4, "ring", None)
  # Per device: the donated state aliases in place; what remains of the arguments is the batch
  # shard, 5 arrays x (2 rows x 32 columns) x 4 bytes.
  assert r["arguments_bytes"] - r["aliased_bytes"] == 5 * 2 * 32 * 4
  assert r["model_flops_per_step"] == _tiny_flops()
  assert r["est_step_sec"] == pytest.approx(_tiny_flops() / (4 * 989e12 * 0.5), rel=1e-12)
  assert "shapes and shardings compile" in proc.stdout
  # The roofline prediction from the compiled program (ctxjax/roofline.py): the ring's
  # collectives cross the context axis, the HLO's matmul FLOPs (loops by trip count) agree
  # with the model's 6N + attention count within the program's recomputation (here the ring's
  # visit loops counted at every block pair, and attention a large share of this tiny model).
  p = r["predicted"]
  assert p["step_sec"] == max(p["roofline_sec"], p["comm_sec"]) > 0 and 0 < p["mfu"] < 1
  assert any(k.startswith("collective-permute over context") for k in p["comm"]), p["comm"]
  assert 0.9 < r["hlo_over_model_flops"] < 2.0
  assert "predicted " in proc.stdout and "assumed " in proc.stdout


# .ci/run sets CTXJAX_REQUIRE_LIBTPU=1: there a missing libtpu fails these tests, so every CI
# run checks the TPU compiles; elsewhere they skip without it.
LIBTPU_REQUIRED = os.environ.get("CTXJAX_REQUIRE_LIBTPU") == "1"
needs_libtpu = pytest.mark.skipif(not (HAS_LIBTPU or LIBTPU_REQUIRED), reason=(
    "libtpu is not installed (pip install -e '.[tpu-aot]'): the TPU topology compile is not "
    "checked here"))


@pytest.fixture
def libtpu():
  if not HAS_LIBTPU:
    pytest.fail("CTXJAX_REQUIRE_LIBTPU=1 (.ci/run) but libtpu is not installed: pip install -e "
                "'.[tpu-aot]' (launch/local.sh test does)", pytrace=False)


def _requirement_pin(requirements, name):
  """The version after `name==` in a list of requirement strings, or None."""
  pins = [r.split(";")[0].split("==")[1].strip() for r in requirements
          if r.split(";")[0].split("==")[0].strip() == name]
  return pins[0] if pins else None


def test_tpu_aot_extra_pins_the_libtpu_of_the_installed_jax():
  """The tpu-aot extra's libtpu is the one jax[tpu] asks for, and the test command installs
  it (a jax upgrade without a libtpu bump would compile against a mismatched TPU compiler)."""
  import importlib.metadata  # noqa: PLC0415
  import tomllib  # noqa: PLC0415
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  jax_tpu = [r for r in importlib.metadata.requires("jax") if 'extra == "tpu"' in r]
  wanted = _requirement_pin(jax_tpu, "libtpu")  # e.g. "0.0.42.*"
  pinned = _requirement_pin(extras["tpu-aot"], "libtpu")
  assert wanted and pinned and (pinned == wanted or (
      wanted.endswith(".*") and pinned.startswith(wanted[:-1]))), (pinned, wanted)
  with open(os.path.join(ROOT, "launch", "local.sh"), encoding="utf-8") as f:
    assert any(l.strip().startswith("test) extras=") and "tpu-aot" in l for l in f)


def _tiny_config(**model):
  """configs/tiny.py with the TINY overrides (in-process: TPU topologies compile from this CPU
  process, no device count to fix)."""
  config = _load("tiny.py")
  config.model.update(scan_layers=True, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                      dtype="bfloat16", **model)
  config.mesh.update(ici_data=1, ici_fsdp=2, ici_context=2)
  config.data.update(seq_len=64, batch_size=4)
  return config


@needs_libtpu
def test_tiny_compile_on_a_tpu_topology(libtpu):
  config = _tiny_config()
  config.mesh.update(ici_fsdp=4, ici_context=1)  # ring is compiled on CPU above; keep this quick
  [r] = aot.run(config, topology="v5p-8", devices=None, stage=None, mfu=0.5)
  assert r["target"] == "v5p-8 (v5p:2x2x1, 4 chips)" and r["fits"] is True
  assert 0 < r["total_gib"] < 0.1 and r["capacity_gib"] == 95
  assert r["est_step_sec"] == pytest.approx(_tiny_flops() / (4 * 459e12 * 0.5), rel=1e-12)
  assert aot.verdict([r]) == (0, [])
  assert "verdict   FITS" in aot.format_report(r)
  p = r["predicted"]
  assert 0.9 < r["hlo_over_model_flops"] < 1.6 and p["binding"] in ("compute", "memory", "comm")
  assert {k.split(" over ")[1] for k in p["comm"]} >= {"fsdp (ici)"}
  assert "roofline  per chip" in aot.format_report(r)


@needs_libtpu
def test_too_big_for_the_chip_is_refused(libtpu):
  # 8 x 64K tokens of 32K-vocab logits on 4 v5e chips: far past 16 GiB per chip; the TPU
  # compiler itself refuses the program.
  config = _tiny_config(vocab_size=32000, max_position_embeddings=65536)
  config.mesh.update(ici_fsdp=4, ici_context=1)
  config.data.update(seq_len=65536, batch_size=8)
  [r] = aot.run(config, topology="v5e-4", devices=None, stage=None, mfu=0.4)
  assert r["fits"] is False and "RESOURCE_EXHAUSTED" in r["compile_error"]
  code, [message] = aot.verdict([r])
  assert code == 1 and "does not fit v5e-4 (v5e:2x2, 4 chips)" in message
  assert "DOES NOT FIT" in aot.format_report(r)


@needs_libtpu
@pytest.mark.parametrize("kind", ["full", "causal"])
def test_splash_compiles_under_a_tpu_mesh(libtpu, monkeypatch, kind):
  """XLA does not partition a Mosaic kernel ("Mosaic kernels cannot be automatically
  partitioned"): splash runs per device in a shard_map, rows over `data` and kv heads over
  `tensor`. Its gradient compiles for 4 v5p chips, the kernel kept as a TPU custom call."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415
  from ctxjax.attention import fused, make_pattern  # noqa: PLC0415
  monkeypatch.setattr(fused, "_backend", lambda: "tpu")
  mesh = Mesh(np.array(topo.topology_devices(topo.parse_topology("v5p-8"))).reshape(2, 2),
              ("data", "tensor"))
  batch, length, heads, kv_heads, head_dim = 4, 512, 8, 4, 128

  def loss(q, k, v, pos, seg):
    out = fused.splash_attention(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                                 k_segment_ids=seg, pattern=make_pattern(kind),
                                 contiguous_positions=True)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  qkv = NamedSharding(mesh, P("data", None, "tensor", None))
  rows = NamedSharding(mesh, P("data", None))
  args = [jax.ShapeDtypeStruct((batch, length, n, head_dim), jnp.bfloat16, sharding=qkv)
          for n in (heads, kv_heads, kv_heads)]
  args += [jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)] * 2
  # The abstract mesh, as ctxjax.aot traces: eager ops under the concrete one would try to run
  # on the (absent) TPU devices.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args)
  hlo = lowered.compile().as_text()
  assert 'custom_call_target="tpu_custom_call"' in hlo
  # The roofline's splash cost: forward (2 matmuls), dq (3) and dkv (4) kernels over the mask's
  # block pairs, on each device's rows and heads (nothing else in this program is a matmul).
  from ctxjax import hlo_costs  # noqa: PLC0415
  blocks = length // 128
  density = (blocks + 1) / (2 * blocks) if kind == "causal" else 1.0
  costs = hlo_costs.program_costs(hlo, splash_density=density, attention=(length, head_dim))
  assert (costs.splash_calls, costs.kernel_calls) == (3, 0)
  per_device = (batch // 2) * (heads // 2) * length * length * head_dim
  assert costs.matmul_flops == pytest.approx(2 * (2 + 3 + 4) * per_device * density)


@needs_libtpu
def test_tpu_compile_runs_the_kernel_a_tpu_picks(libtpu):
  """Packed training at T=256 on a TPU: `auto` compiles splash (the step vouches for packed
  positions), per device under the fsdp mesh, and the roofline costs its kernels."""
  config = _tiny_config()
  config.mesh.update(ici_fsdp=4, ici_context=1)
  config.data.update(seq_len=256, batch_size=4)
  [r] = aot.run(config, topology="v5p-8", devices=None, stage=None, mfu=0.5)
  assert r["fits"] is True and r["attention_impl"] == "auto"
  p = r["predicted"]
  assert p["splash_calls"] > 0 and p["kernel_calls"] == 0 and p["dynamic_loops"] == 0
  assert 0.9 < r["hlo_over_model_flops"] < 1.6
  assert "splash attention kernel calls per step" in aot.format_report(r)
  config.data.position_ids = "pose"  # positions the step cannot vouch for: blockwise
  config.data.max_position_id = 1024
  [r] = aot.run(config, topology="v5p-8", devices=None, stage=None, mfu=0.5)
  assert r["predicted"]["splash_calls"] == 0 and r["predicted"]["dynamic_loops"] > 0
