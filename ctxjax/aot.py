"""Ahead-of-time pod checks: compile a recipe's full train step for hardware you do not have.

  python -m ctxjax.aot --config=configs/llama2_7b_80k.py --topology=v5p-128 [--stage=i] [--mfu=0.4]
  python -m ctxjax.aot --config=configs/llama2_7b_8xh100.py --devices=cpu:8
  python -m ctxjax.aot --config=configs/lwm_1m.py     # the recipe's own config.aot target

TPU mode: libtpu describes the topology's chips (jax.experimental.topologies, no TPU attached);
the train step (parameters, AdamW state and the batch at the recipe's / stage's shapes, sharded
by the recipe's mesh) is lowered and compiled by the real TPU compiler on this CPU host. It
prints per-chip HBM (XLA's memory_analysis) and exits 1 when a stage does not fit the chip's HBM
(MaxText's train_compile.py does the same for its configs), and PREDICTS the step time from the
compiled program: ctxjax/hlo_costs.py walks its post-optimisation HLO (loops by trip count:
scanned layers, the ring's scan, gradient accumulation) for matmul FLOPs, HBM bytes and every
collective with its bytes and the mesh axes (ICI or DCN) its groups cross; ctxjax/roofline.py
turns them into compute, memory and communication terms per chip, the binding term, a step time
(per-kernel max(compute, memory), collectives overlapped; the serial sum beside it) and the MFU
it implies. `--mfu` keeps the old figure beside it: the step time at an ASSUMED MFU of the
model's 6N + attention FLOPs. `--hlo_dir` saves the compiled HLO text it read.
CPU mode (`--devices=cpu:N`): N fake CPU devices with the recipe's mesh — a shape and sharding
consistency check for GPU recipes; the memory figures are XLA:CPU's buffer assignment, shown
against the H100's 80 GB as an indication only (GPU fusion and buffers differ), never a verdict.

Kernels: TPU mode chooses kernels as a TPU run does (`fused.kernels_for("tpu")`):
`attention_impl="auto"` compiles splash (Pallas) where its index-built masks equal the
position rule — causal / sliding-window training on packed data, whose positions the train
step vouches for — and blockwise otherwise (ctxjax/attention/fused.py). Splash's Mosaic
kernels carry no cost in the HLO: the roofline costs them from their shapes and mask
(hlo_costs.splash_cost). CPU mode keeps the host's choice (blockwise: the cuDNN call does not
lower on CPU). Context parallelism ("ring"/"all_gather") is the same code on every backend.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time

from absl import flags
from ml_collections import config_flags

from ctxjax.train import topology as topo
from ctxjax.train.config import run_config


def define_flags() -> None:
  """The command's flags, defined on demand: importing this module defines none (ctxjax.study
  imports it for `--aot` and has a --config flag of its own)."""
  config_flags.DEFINE_config_file("config", None, "Path to a configs/<recipe>.py file.",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, "TPU product name: v4-N, v5p-N (N TensorCores), "
                      "v5e-N / v5litepod-N, v6e-N (N chips). Default: config.aot.")
  flags.DEFINE_string("devices", None, "cpu:N — N fake CPU devices (GPU recipes' "
                      "shape/sharding check) instead of --topology.")
  flags.DEFINE_integer("stage", None, "Check only this stage (default: every stage).")
  flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the 'assumed' step "
                     "time printed beside the roofline prediction.")
  flags.DEFINE_string("json", None, "Merge the results into this JSON file (a list).")
  flags.DEFINE_string("hlo_dir", None, "Also write each stage's compiled (post-"
                      "optimisation) HLO text to <dir>/stage<i>.hlo.txt.")
  flags.mark_flags_as_required(["config"])


GiB = topo.GiB


@dataclasses.dataclass(frozen=True)
class Target:
  """What we compile for: its devices, the chip they stand for, and a label."""
  label: str
  devices: list
  chip: topo.ChipSpec
  memory_verdict: bool     # False on fake CPU devices: XLA:CPU's buffers are not the GPU's
  kernel_platform: str | None = None  # `auto` chooses kernels for it (None: the host's backend)


def parse_devices(spec: str) -> int:
  match = re.fullmatch(r"cpu:(\d+)", spec or "")
  if not match or int(match.group(1)) < 1:
    raise ValueError(f"--devices={spec!r}; valid form: cpu:N with N >= 1 (e.g. cpu:8)")
  return int(match.group(1))


def tpu_target(name: str) -> Target:
  t = topo.parse_topology(name)
  label = f"{t.name} ({t.libtpu_topology}, {t.num_chips} chips)"
  return Target(label, topo.topology_devices(t), t.chip, True, kernel_platform="tpu")


def cpu_target(count: int) -> Target:
  import jax
  devices = jax.devices("cpu")
  if len(devices) != count:
    raise ValueError(f"--devices=cpu:{count} but JAX has {len(devices)} CPU devices (the CPU "
                     f"backend was started before the flag took effect)")
  return Target(f"{count} fake CPU devices (GPU recipe check, H100 figures)", devices, topo.H100,
                False)


def abstract_batch(batch_size: int, seq_len: int, sharding) -> dict:
  import jax
  import jax.numpy as jnp
  shape = (batch_size, seq_len)
  out = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
         for k in ("inputs", "targets", "positions", "segment_ids")}
  out["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
  return out


def memory_report(memory, hbm_bytes: int) -> dict:
  """Per-device bytes from XLA's memory_analysis; total = arguments + outputs - aliased
  (the donated state is updated in place) + temporaries + generated code."""
  out = {"arguments_bytes": memory.argument_size_in_bytes,
         "outputs_bytes": memory.output_size_in_bytes,
         "aliased_bytes": memory.alias_size_in_bytes,
         "temporaries_bytes": memory.temp_size_in_bytes,
         "code_bytes": memory.generated_code_size_in_bytes}
  total = (out["arguments_bytes"] + out["outputs_bytes"] - out["aliased_bytes"]
           + out["temporaries_bytes"] + out["code_bytes"])
  return {**out, "total_gib": total / GiB, "capacity_gib": hbm_bytes / GiB,
          "fits": total <= hbm_bytes}


def lower_stage(cfg, stage, devices):
  """(lowered train step, model config, mesh) for one stage of `cfg` (a RunConfig:
  ctxjax/train/config.py) on `devices`: parameters, AdamW state and the batch as abstract
  arrays sharded by the recipe's mesh (nothing allocated)."""
  import jax
  from ctxjax.model import Transformer
  from ctxjax.train import sharding
  from ctxjax.train import stages as stages_lib
  from ctxjax.train.optim import make_optimizer
  from ctxjax.train.step import abstract_train_state, make_train_step

  model_cfg = stages_lib.stage_model_config(cfg.model, stage)
  mesh = sharding.create_mesh(cfg.mesh, devices)
  rules = sharding.logical_rules(cfg.mesh)
  sharding.check_batch_divisible(mesh, stage.batch_size, stage.seq_len)
  data_cfg = dataclasses.replace(cfg.data, seq_len=stage.seq_len, batch_size=stage.batch_size)
  model = Transformer(model_cfg)
  tx, _ = make_optimizer(cfg.optim, stages_lib.total_steps(stages_lib.resolve_stages(cfg)))
  # ring/all_gather attention look the mesh up while tracing init; an abstract mesh, because
  # eager ops under a concrete one would try to run on the (absent) TPU devices.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    state, state_shardings = abstract_train_state(model, tx, stage.batch_size, stage.seq_len,
                                                  mesh=mesh, rules=rules)
  step = make_train_step(model, tx, data_cfg, mesh=mesh, rules=rules,
                         state_shardings=state_shardings,
                         grad_accum_steps=cfg.train.grad_accum_steps)
  batch = abstract_batch(stage.batch_size, stage.seq_len, sharding.batch_sharding(mesh, rules))
  return step.lower(state, batch), model_cfg, mesh


def check_stage(cfg, stage, target: Target, mfu: float, hlo_dir: str | None = None) -> dict:
  """Lower and compile stage `stage` of `cfg` (a RunConfig) for `target`; the report."""
  from ctxjax.attention import fused
  from ctxjax.model.flops import param_count, train_flops_per_token

  start = time.perf_counter()
  with fused.kernels_for(target.kernel_platform):  # e.g. splash where a TPU run picks it
    lowered, model_cfg, mesh = lower_stage(cfg, stage, target.devices)
  lower_sec = time.perf_counter() - start
  try:
    compiled, compile_error = lowered.compile(), None
  except Exception as err:  # noqa: BLE001  (the TPU compiler rejects programs over HBM)
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    compiled, compile_error = None, str(err).strip().splitlines()[0][:400]
  compile_sec = time.perf_counter() - start - lower_sec

  tokens = stage.batch_size * stage.seq_len
  model_flops = train_flops_per_token(model_cfg, stage.seq_len) * tokens
  chips = len(target.devices)
  step_sec = model_flops / (chips * target.chip.peak_flops * mfu)
  report = {
      "stage": stage.index, "target": target.label,
      "devices": chips, "mesh": dict(mesh.shape), "attention_impl": model_cfg.attention_impl,
      "params": param_count(model_cfg)["total"], "seq_len": stage.seq_len,
      "batch_size": stage.batch_size, "tokens_per_step": tokens,
      "grad_accum_steps": cfg.train.grad_accum_steps,
      "rope_theta": model_cfg.rope_theta, "steps": stage.steps,
      "lower_sec": round(lower_sec, 1), "compile_sec": round(compile_sec, 1),
      "model_flops_per_step": model_flops, "mfu": mfu,
      "peak_flops_per_chip": target.chip.peak_flops, "est_step_sec": step_sec,
      "est_tokens_per_sec": tokens / step_sec, "est_stage_hours": step_sec * stage.steps / 3600,
      "memory_verdict": target.memory_verdict,
  }
  if compiled is None:
    report.update(fits=False, compile_error=compile_error)
    return report
  report.update(memory_report(compiled.memory_analysis(), target.chip.hbm_bytes))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    # Per-device program; XLA counts a while-loop body (the layer scan) once, not per trip.
    report["xla_flops_per_step"] = float(cost["flops"]) * chips
  hlo_text = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"stage{stage.index}.hlo.txt"), "w", encoding="utf-8") as f:
      f.write(hlo_text)
  report.update(predicted_report(hlo_text, mesh, target, model_flops, model_cfg,
                                stage.seq_len))
  if not target.memory_verdict:
    report["fits"] = None
  return report


def predicted_report(hlo_text: str, mesh, target: Target, model_flops: float, model_cfg,
                     seq_len: int) -> dict:
  """The roofline prediction from the compiled program (ctxjax/roofline.py): its terms, step
  time, binding term and MFU, and the HLO matmul FLOPs against the model's count."""
  from ctxjax import hlo_costs, roofline
  from ctxjax.attention import fused
  chips = len(target.devices)
  # Blockwise attention's visit loops have data-dependent trip counts: without a ring a device
  # holds whole causal rows and visits ~half its block pairs; in a ring the busiest device
  # meets a fully visible key shard at every step (no load balancing), so all of them.
  causal = (model_cfg.attention_pattern.kind == "causal"
            and model_cfg.attention_impl != "ring")
  costs = hlo_costs.program_costs(hlo_text, causal_visits=causal,
                                  splash_density=fused.splash_density(
                                      model_cfg.attention_pattern, seq_len),
                                  attention=(seq_len, model_cfg.head_dim))
  pred = roofline.predict(costs, roofline.MeshInfo.from_mesh(mesh), target.chip, model_flops,
                          chips)
  pred["causal_visits"] = causal
  return {"predicted": pred, "hlo_flops_per_step": pred["hlo_flops_per_chip"] * chips,
          "hlo_over_model_flops": pred["hlo_flops_per_chip"] * chips / model_flops}


def format_report(r: dict) -> str:
  lines = [f"{r['config']} stage {r['stage']} on {r['target']}",
           f"  model     {r['params'] / 1e6:,.1f}M params, seq_len {r['seq_len']}, global batch "
           f"{r['batch_size']} ({r['tokens_per_step']:,} tokens), grad_accum "
           f"{r['grad_accum_steps']}, rope_theta {r['rope_theta']:g}",
           f"  mesh      {r['mesh']}, attention {r['attention_impl']}",
           f"  compile   lower {r['lower_sec']} s + compile {r['compile_sec']} s"]
  if "compile_error" in r:
    lines.append(f"  HBM/chip  the compiler refused the program: {r['compile_error']}")
  else:
    gib = {k: r[f"{k}_bytes"] / GiB for k in ("arguments", "outputs", "aliased", "temporaries",
                                               "code")}
    lines.append(f"  HBM/chip  arguments {gib['arguments']:.2f} + outputs {gib['outputs']:.2f}"
                 f" - aliased {gib['aliased']:.2f} + temporaries {gib['temporaries']:.2f}"
                 f" + code {gib['code']:.2f} = {r['total_gib']:.2f} GiB of "
                 f"{r['capacity_gib']:.1f} GiB")
  xla = r.get("xla_flops_per_step")
  lines.append(f"  FLOPs     {r['model_flops_per_step']:.3e}/step (model: 6N + attention)"
               + (f"; XLA cost analysis {xla:.3e} (loop bodies counted once)" if xla else ""))
  if "predicted" in r:
    lines += format_prediction(r)
  lines.append(f"  assumed   {r['est_step_sec']:.3g} s/step at MFU {r['mfu']:g} "
               f"({r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s peak x {r['devices']}) -> "
               f"{r['est_tokens_per_sec']:,.0f} tokens/s; {r['steps']} steps = "
               f"{r['est_stage_hours']:.3g} h")
  if r["fits"] is None:
    lines.append("  verdict   shapes and shardings compile (XLA:CPU memory is indicative only)")
  else:
    lines.append(f"  verdict   {'FITS' if r['fits'] else 'DOES NOT FIT'}")
  return "\n".join(lines)


def format_prediction(r: dict) -> list[str]:
  """The roofline lines of a report: HLO FLOPs vs the model's, the terms, the comm table."""
  p = r["predicted"]
  lines = [f"  HLO       {r['hlo_flops_per_step']:.3e} matmul FLOPs/step walked over {p['loops']} "
           f"loops by trip count = {r['hlo_over_model_flops']:.3f} x the model's "
           f"(its recomputation included)"
           + (f"; {p['dynamic_loops']} data-dependent loops (blockwise attention) at "
              f"{'(n + 1) / 2 (causal)' if p['causal_visits'] else 'n'} of their enclosing "
              f"loop's n" if p["dynamic_loops"] else ""),
           f"  roofline  per chip: compute {p['compute_sec']:.3g} s, memory {p['memory_sec']:.3g} "
           f"s (per kernel max(compute, memory): {p['roofline_sec']:.3g} s), comm "
           f"{p['comm_sec']:.3g} s -> {p['binding']} binds",
           f"  predicted {p['step_sec']:.3g} s/step (collectives overlapped; serial "
           f"{p['serial_sec']:.3g} s) -> MFU {p['mfu']:.3f}, "
           f"{r['tokens_per_step'] / p['step_sec']:,.0f} tokens/s; {r['steps']} steps = "
           f"{p['step_sec'] * r['steps'] / 3600:.3g} h"]
  if p.get("splash_calls"):
    lines.append(f"  kernels   {p['splash_calls']:,.0f} splash attention kernel calls per step, "
                 f"costed from their shapes and mask (hlo_costs.splash_cost)")
  if p.get("kernel_calls"):
    lines.append(f"  kernels   {p['kernel_calls']:,.0f} other Mosaic kernel calls per step carry "
                 f"no cost in the HLO and are left out of these terms: the prediction is short "
                 f"by their time")
  for key, c in list(p["comm"].items())[:4]:
    lines.append(f"  comm      {key}: {c['count']:,.0f} x, {c['bytes'] / GiB:.2f} GiB, "
                 f"{c['seconds']:.3g} s")
  return lines


def merge_json(path: str, reports: list[dict]) -> None:
  """Replace earlier results for the same (config, stage, target); keep the rest."""
  old = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  key = lambda r: (r["config"], r["stage"], r["target"])
  new_keys = {key(r) for r in reports}
  merged = [r for r in old if key(r) not in new_keys] + reports
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(merged, f, indent=1)
    f.write("\n")


def choose_target(config, topology: str | None, devices: str | None) -> tuple:
  """(topology, devices): the flags, else the recipe's own `config.aot` (exactly one set)."""
  if topology is None and devices is None:
    aot = run_config(config).aot
    topology, devices = aot.topology, aot.devices
  if (topology is None) == (devices is None):
    raise ValueError("give exactly one of --topology (TPU) and --devices=cpu:N (or set "
                     "config.aot.topology / config.aot.devices in the recipe)")
  return topology, devices


def run(config, *, name: str = "", topology: str | None, devices: str | None, stage: int | None,
        mfu: float, emit=lambda report: None, hlo_dir: str | None = None) -> list[dict]:
  """Check the selected stages of `config` (a ConfigDict or RunConfig; each report also goes
  to `emit` as soon as it is ready); raises ValueError on bad flags or configs."""
  from ctxjax.train import stages as stages_lib
  cfg = run_config(config)
  topology, devices = choose_target(cfg, topology, devices)
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu={mfu}; it must lie in (0, 1]")
  all_stages = stages_lib.resolve_stages(cfg)
  if stage is not None and not 0 <= stage < len(all_stages):
    raise ValueError(f"--stage={stage}; the recipe has stages 0..{len(all_stages) - 1}")
  target = tpu_target(topology) if topology else cpu_target(parse_devices(devices))
  reports = []
  for s in all_stages if stage is None else [all_stages[stage]]:
    reports.append({"config": name, **check_stage(cfg, s, target, mfu, hlo_dir)})
    emit(reports[-1])
  return reports


def verdict(reports: list[dict]) -> tuple[int, list[str]]:
  """(exit code, messages): 1 with one message per stage that does not fit, else 0."""
  messages = []
  for r in reports:
    if r["fits"] is not False:
      continue
    need = r.get("total_gib")
    why = (f"{need:.1f} GiB per chip > {r['capacity_gib']:.1f} GiB" if need is not None
           else r["compile_error"])
    messages.append(f"ctxjax.aot: stage {r['stage']} does not fit {r['target']}: {why}; shard "
                    f"more (mesh.ici_fsdp / ici_context / ici_tensor), raise "
                    f"train.grad_accum_steps, or set model.remat_policy='full'")
  return (1 if messages else 0), messages


def main(argv):
  del argv
  from ctxjax import cli  # noqa: PLC0415
  f = flags.FLAGS
  cfg = run_config(f.config)  # bad input: one line, exit 2 (ctxjax/cli.py)
  topology, devices = choose_target(cfg, f.topology, f.devices)
  import jax  # before any JAX backend starts: this tool only compiles, on the host's CPU
  jax.config.update("jax_platforms", "cpu")
  if devices:
    jax.config.update("jax_num_cpu_devices", parse_devices(devices))
  try:
    reports = run(cfg, name=config_flags.get_config_filename(flags.FLAGS["config"]),
                  topology=topology, devices=devices, stage=f.stage, mfu=f.mfu,
                  emit=lambda r: print(format_report(r), flush=True), hlo_dir=f.hlo_dir)
  except RuntimeError as err:  # libtpu missing or refusing the topology (ctxjax/train/topology.py)
    raise cli.UserError(str(err)) from err
  if f.json:
    merge_json(f.json, reports)
  code, messages = verdict(reports)
  for message in messages:
    print(message, file=sys.stderr)
  return code


if __name__ == "__main__":
  from ctxjax import cli
  define_flags()
  cli.run("ctxjax.aot", lambda argv: sys.exit(main(argv)))
