"""The HLO reader and walker (ctxjax/hlo_text.py, hlo_costs.py) and the roofline (ctxjax/roofline.py) behind
`python -m ctxjax.aot`'s predicted step time: loops counted by trip count, collectives found with
their bytes and mesh axes, and the roofline arithmetic on a hand-made program."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ctxjax import hlo_costs, hlo_text, roofline
from ctxjax.train import topology as topo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scan_flops_counted_by_trip_count():
  def f(x, w):
    def body(c, _):
      return jnp.tanh(c @ w), None
    return jax.lax.scan(body, x, None, length=5)[0].sum()

  compiled = jax.jit(f).lower(jnp.ones((16, 32)), jnp.ones((32, 32))).compile()
  costs = hlo_costs.program_costs(compiled.as_text())
  assert [n for _, n in costs.loops] == [5] and costs.dynamic_loops == 0
  assert costs.matmul_flops == 5 * 2 * 16 * 32 * 32
  # cost_analysis counts the body once: the walker's total is what the program runs.
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert xla["flops"] < 2 * 2 * 16 * 32 * 32
  # Each of the 5 trips reads the carry and weights and writes the carry (f32, off-chip).
  assert costs.hbm_bytes >= 5 * (16 * 32 + 32 * 32 + 16 * 32) * 4


def test_nested_loops_multiply():
  def f(x):
    def outer(c, _):
      return jax.lax.fori_loop(0, 3, lambda i, y: y @ y.T @ y, c), None
    return jax.lax.scan(outer, x, None, length=4)[0]

  costs = hlo_costs.program_costs(jax.jit(f).lower(jnp.ones((8, 16))).compile().as_text())
  per_inner = 2 * 8 * 16 * 8 + 2 * 8 * 8 * 16
  assert costs.matmul_flops == 4 * 3 * per_inner


# 8 fake CPU devices exist only in a fresh process (the device count is fixed at backend start).
SHARD_MAP = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2, 4), ("a", "b"))
def g(x):
  s = jax.lax.psum(x, "b")
  ag = jax.lax.all_gather(x, "a", tiled=True)
  pp = jax.lax.ppermute(x, "b", [(i, (i + 1) % 4) for i in range(4)])
  return s.sum() + ag.sum() + pp.sum()
h = jax.jit(jax.shard_map(g, mesh=mesh, in_specs=P("a", "b"), out_specs=P(), check_vma=False))
arg = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=NamedSharding(mesh, P("a", "b")))
print(h.lower(arg).compile().as_text())
"""


@pytest.fixture(scope="module")
def shard_map_hlo():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
  proc = subprocess.run([sys.executable, "-c", SHARD_MAP], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def test_collectives_bytes_and_axes(shard_map_hlo):
  costs = hlo_costs.program_costs(shard_map_hlo)
  by_kind = {c.kind: c for c in costs.collectives}
  assert sorted(by_kind) == ["all-gather", "all-reduce", "collective-permute"]
  shard = 4 * 16 * 4  # f32[4, 16] per device
  assert by_kind["all-reduce"].payload_bytes == shard
  assert by_kind["all-gather"].payload_bytes == 2 * shard  # the gathered [8, 16]
  assert by_kind["collective-permute"].payload_bytes == shard
  mesh = roofline.MeshInfo(("a", "b"), (2, 4), (0,) * 8, None)
  rows = {r["kind"]: r for r in roofline.collective_terms(costs.collectives, mesh, topo.H100)}
  assert {k: (r["axes"], r["group_size"], r["link"]) for k, r in rows.items()} == {
      "all-reduce": (("b",), 4, "ici"), "all-gather": (("a",), 2, "ici"),
      "collective-permute": (("b",), 2, "ici")}
  # Two slices along "a": the all-gather's groups cross DCN; the others stay on ICI.
  two_slices = roofline.MeshInfo(("a", "b"), (2, 4), (0,) * 4 + (1,) * 4, None)
  links = {r["kind"]: r["link"] for r in roofline.collective_terms(costs.collectives, two_slices,
                                                                    topo.H100)}
  assert links == {"all-reduce": "ici", "all-gather": "dcn", "collective-permute": "ici"}


@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,2},{1,3}}, dimensions={0}", [[0, 2], [1, 3]]),
    ("replica_groups=[2,2]<=[4], dimensions={1}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={1}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, dimensions={2}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=2] {'axis_2'}, x=1", [[0, 1], [2, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}, x=1", [[0, 1, 2, 3]]),
])
def test_replica_group_forms(text, groups):
  assert hlo_text.replica_groups(text) == groups


def test_convolution_flops_count_only_real_taps():
  # A dot written as a convolution (as the TPU compiler prints them): a window of 2 padded by
  # one on each side over a spatial size 1 -> output size 2, one real tap per output position.
  shapes = {"a": "bf16[1,8,4,1]{3,2,1,0}", "b": "bf16[2,16,4,1]{3,2,1,0}"}
  instr = hlo_text.parse_instruction(
      "  %c = bf16[1,8,2,16]{3,2,1,0} convolution(%a, %b), window={size=1x2 pad=0_0x1_1 "
      "rhs_reversal=0x1}, dim_labels=0bf1_1oi0->0b1f")
  assert instr.opcode == "convolution" and instr.operands == ["a", "b"]
  # batch 8 x out features 16 x in features 4 x (spatial0: 1 pair) x (spatial1: 2 real pairs)
  assert hlo_costs.conv_flops(instr, shapes) == 2 * 8 * 16 * 4 * 1 * 2


def test_roofline_arithmetic():
  chip = topo.ChipSpec("x", 0, peak_flops=100.0, dims=3, libtpu_name="", hbm_bandwidth=10.0,
                       ici_link_bandwidth=4.0, ring_links=2, dcn_bandwidth=1.0)
  costs = hlo_costs.ProgramCosts(
      matmul_flops=2000.0, hbm_bytes=100.0,
      # a compute-bound kernel run 3 times, a memory-bound one once
      ops=[(600.0, 10.0, 3), (200.0, 70.0, 1)],
      collectives=[
          hlo_costs.Collective("all-gather", "ag", 80.0, [[0, 1, 2, 3]], [], 2),
          hlo_costs.Collective("all-reduce", "ar", 16.0, [[0, 4], [1, 5], [2, 6], [3, 7]], [], 1),
          hlo_costs.Collective("collective-permute", "cp", 8.0, [], [(0, 1), (1, 0), (2, 2)], 5),
      ])
  # 8 chips on a 2 x 4 mesh ("dcn", "fsdp"), two slices along "dcn"; fsdp chips along one
  # physical dimension.
  coords = tuple((i % 4, 0, 0) for i in range(8))
  mesh = roofline.MeshInfo(("dcn", "fsdp"), (2, 4), (0,) * 4 + (1,) * 4, coords)
  p = roofline.predict(costs, mesh, chip, model_flops=8 * 1000.0, chips=8)
  assert p["compute_sec"] == pytest.approx(20.0) and p["memory_sec"] == pytest.approx(10.0)
  assert p["roofline_sec"] == pytest.approx(3 * 6.0 + 7.0)     # max(6, 1) x 3 + max(2, 7)
  ag = 2 * 80.0 * 3 / 4 / (4.0 * 2)                             # ICI ring, both directions
  ar = 2 * 16.0 * 1 / 2 / 1.0                                   # crosses the slices: DCN
  cp = 5 * 8.0 / 4.0                                            # one hop, one link
  assert p["comm_sec"] == pytest.approx(ag + ar + cp)
  assert p["step_sec"] == pytest.approx(max(25.0, ag + ar + cp))
  assert p["serial_sec"] == pytest.approx(25.0 + ag + ar + cp)
  assert p["binding"] == "comm"
  assert p["mfu"] == pytest.approx(8000.0 / (8 * 100.0 * p["step_sec"]))
  assert list(p["comm"]) == ["all-reduce over dcn (dcn)", "all-gather over fsdp (ici)",
                             "collective-permute over fsdp (ici)"]


def test_chip_link_specs():
  assert {g: (c.hbm_bandwidth, c.ici_link_bandwidth, c.dcn_bandwidth)
          for g, c in topo.CHIPS.items()} == {
      "v4": (1.2e12, 4.5e10, 6.25e9), "v5e": (8.19e11, 4.5e10, 3.125e9),
      "v5p": (2.765e12, 9e10, 6.25e9), "v6e": (1.64e12, 9e10, 1.25e10)}


def test_in_place_updates_count_the_slice_not_the_buffer():
  """A loop that reads and rewrites one row of a 256 KiB buffer per trip (a blockwise kernel's
  take_blocks / put_blocks) moves about a row per trip, not the buffer."""
  def f(buf, row):
    def body(i, b):
      r = jax.lax.dynamic_slice_in_dim(b, i, 1) * 2.0 + row
      return jax.lax.dynamic_update_slice_in_dim(b, r, i, 0)
    return jax.lax.fori_loop(0, 8, body, buf)

  costs = hlo_costs.program_costs(
      jax.jit(f, donate_argnums=0).lower(jnp.ones((1024, 64)), jnp.ones((1, 64))).compile()
      .as_text())
  buffer = 1024 * 64 * 4
  assert [n for _, n in costs.loops] == [8]
  assert costs.hbm_bytes < 2 * buffer  # whole-buffer counting: >= 8 x 2 x buffer


def test_trip_count_read_off_the_loop():
  """Without XLA's known_trip_count the count comes from the loop itself: start, step, bound."""
  def f(x, w):
    return jax.lax.fori_loop(3, 17, lambda i, c: jnp.tanh(c @ w), x)

  text = jax.jit(f).lower(jnp.ones((4, 8)), jnp.ones((8, 8))).compile().as_text()
  stripped = "\n".join(re.sub(r', backend_config=\{"dynamic_variables.*$', "", line)
                       if " while(" in line else line for line in text.splitlines())
  assert "known_trip_count" in text and "known_trip_count" not in stripped
  for hlo in (text, stripped):
    costs = hlo_costs.program_costs(hlo)
    assert [n for _, n in costs.loops] == [14] and costs.dynamic_loops == 0
    assert costs.matmul_flops == 14 * 2 * 4 * 8 * 8


def test_data_dependent_loops_take_the_enclosing_count():
  """A loop bounded by data (blockwise attention's visit lists) inside a loop of n trips runs
  n times (every pair of a square grid), or (n + 1) / 2 with causal_visits."""
  def f(x, w, counts):
    def outer(i, c):
      return jax.lax.fori_loop(0, counts[i], lambda j, y: y @ w, c)
    return jax.lax.fori_loop(0, 4, outer, x)

  text = jax.jit(f).lower(jnp.ones((4, 8)), jnp.ones((8, 8)), jnp.ones(4, jnp.int32)) \
      .compile().as_text()
  per_trip = 2 * 4 * 8 * 8
  square = hlo_costs.program_costs(text)
  causal = hlo_costs.program_costs(text, causal_visits=True)
  assert square.dynamic_loops == causal.dynamic_loops == 1
  assert square.matmul_flops == 4 * 4 * per_trip and causal.matmul_flops == 4 * 2.5 * per_trip


def test_convolution_spatial_dims_in_window_order():
  # The TPU compiler's projection with heads as a spatial dim: lhs labels list spatial 1 before
  # 0; the window lists dim 0 (32 wide, padded 31 each side over a size-1 input: one real tap
  # per output position) then dim 1 (2 taps).
  shapes = {"a": "bf16[64,2,16,1]", "b": "bf16[32,8,2,16]"}
  instr = hlo_text.parse_instruction(
      "  %c = bf16[64,32,8,1]{3,2,1,0} convolution(%a, %b), window={size=32x2 pad=31_31x0_0 "
      "rhs_reversal=1x0}, dim_labels=b1f0_0o1i->b0f1")
  # = a [64, 2x16] @ [2x16, 32x8] matmul
  assert hlo_costs.conv_flops(instr, shapes) == 2 * 64 * (2 * 16) * (32 * 8)
