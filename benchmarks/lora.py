"""LoRA / LongLoRA / LongQLoRA on the tiny model (configs/tiny.py: d 256, 4 layers, vocab 1024).

  python benchmarks/lora.py [--pretrain_steps=150] [--finetune_steps=30] [--init_from=WORKDIR]

1. Pretrain configs/tiny.py (T=256) with ctxjax.train.trainer.train into a temporary workdir
   (or take --init_from, a finished configs/tiny.py run) and read its parameters back from the
   trainer's checkpoint (export_hf.read_workdir).
2. Fine-tune each variant of configs/tiny_longlora.py (full, lora, longlora, int8, nf4) from
   those parameters at T=1024 (linear PI x4, S2-Attn in training) on the same batches with the
   same optimizer settings; gradients of the trainable leaves only
   (ctxjax.train.trainable.value_and_grad). Reported per variant: trainable parameters, bytes
   of the optimizer state's leaves, train loss (first step, mean of the last 5), held-out loss
   at T=1024 with full attention, seconds per step (CPU; noisy).
3. Frozen base of the block projections stored as bf16 / int8 / NF4: bytes, and the logits
   error each introduces vs the float32 pretrained model (max abs, mean abs) on held-out rows.
4. Merged export parity: the fine-tuned longlora and nf4 models saved with ctxjax.hf.save
   (adapters merged, NF4 dequantized) and loaded with transformers' LlamaForCausalLM: max abs
   logits difference vs the ctxjax adapter model (needs the hf extra; skipped without it).
Writes benchmarks/results/lora.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import logging  # noqa: E402

from configs import tiny, tiny_longlora  # noqa: E402
from ctxjax import export_hf  # noqa: E402
from ctxjax.data.demo import DemoData  # noqa: E402
from ctxjax.model import Transformer, lora, model_config_from_dict  # noqa: E402
from ctxjax.model import params as params_lib  # noqa: E402
from ctxjax.train import trainable  # noqa: E402
from ctxjax.train.optim import make_optimizer  # noqa: E402
from ctxjax.train.step import cross_entropy, make_eval_step  # noqa: E402
from ctxjax.train.trainer import train  # noqa: E402

VARIANTS = ("full", "lora", "longlora", "int8", "nf4")
EVAL_BATCHES = 4


def pretrain(workdir: str, steps: int) -> dict:
  config = tiny.get_config()
  config.train.steps, config.train.save_every, config.train.eval_batches = steps, steps, 2
  config.train.log_every = max(steps // 5, 1)
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 3)
  summary = train(config, workdir)
  _, variables, _ = export_hf.read_workdir(workdir)
  return summary, jax.tree.map(jnp.asarray, variables["params"])


def batches(config, split: str):
  return DemoData(split=split, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                  vocab_size=config.model.vocab_size, seed=config.train.seed,
                  data_dir=config.data.get("data_dir") or None,
                  positions=config.data.get("packed_positions", "per_document"))


def eval_loss(model, params, config) -> float:
  nll = make_eval_step(model)
  total = count = 0.0
  for i, batch in enumerate(batches(config, "validation")):
    if i == EVAL_BATCHES:
      break
    a, b = nll(params, batch)
    total, count = total + float(a), count + float(b)
  return total / count


def finetune(variant: str, base_params, steps: int) -> tuple[dict, dict, object]:
  config = tiny_longlora.get_config(variant)
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps)
  cfg = model_config_from_dict(config.model)
  model = Transformer(cfg)
  params = params_lib.init_from_base(base_params, cfg, jax.random.PRNGKey(config.train.seed))
  tx, _ = make_optimizer(config.optim, steps)
  mask = trainable.trainable_mask(params, list(config.optim.trainable))

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["inputs"], batch["positions"],
                         batch["segment_ids"], train=True)
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

  @jax.jit
  def step(p, opt_state, batch):
    loss, grads = trainable.value_and_grad(loss_fn, mask)(p, batch)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  opt_state = jax.jit(tx.init)(params)
  flat_mask = params_lib.flatten(mask)
  row = {
      "variant": variant, "lora_rank": cfg.lora_rank,
      "lora_targets": list(cfg.lora_targets) if cfg.lora_rank else [],
      "base_quantization": cfg.base_quantization, "trainable": list(config.optim.trainable),
      "params_trainable": sum(int(np.size(x)) for p, x in params_lib.flatten(params).items()
                              if flat_mask[p]),
      "opt_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(opt_state))),
      "param_bytes": params_lib.weight_bytes(params),  # all parameters, as stored
      "eval_loss_before": eval_loss(model, params, config),
  }
  losses, times = [], []
  data = batches(config, "train")
  for _ in range(steps):
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, next(data))
    losses.append(float(loss))  # blocks
    times.append(time.perf_counter() - start)
  row.update(train_loss_first=losses[0], train_loss_last5=float(np.mean(losses[-5:])),
             eval_loss_after=eval_loss(model, params, config),
             sec_per_step=float(np.median(times[1:])), compile_and_first_step_sec=times[0])
  return row, params, model


def quantization_rows(base_params) -> list[dict]:
  """Frozen block-projection base in bf16 / int8 / nf4 vs the float32 pretrained model."""
  config = tiny_longlora.get_config("longlora")
  plain = {**config.model.to_dict(), "lora_rank": 0, "attention_mode": "standard",
           "attention_options": {}}  # the pretrained model, at T=1024 with PI x4
  cfg = model_config_from_dict(plain)
  batch = next(iter(batches(config, "validation")))
  ref_apply = jax.jit(Transformer(cfg).apply)
  ref = np.asarray(ref_apply({"params": base_params}, batch["inputs"]), np.float64)
  is_base = lambda p: p.split("/")[-2] in lora.BLOCK_PROJECTIONS
  f32_bytes = params_lib.weight_bytes(base_params, is_base)
  rows = []
  for fmt in ("bfloat16", "int8", "nf4"):
    if fmt == "bfloat16":
      qcfg, apply = cfg, ref_apply
      params = params_lib.unflatten({
          p: (x.astype(jnp.bfloat16).astype(x.dtype) if is_base(p) else x)
          for p, x in params_lib.flatten(base_params).items()})
      nbytes = f32_bytes // 2
    else:
      qcfg = model_config_from_dict({**plain, "base_quantization": fmt})
      params = params_lib.quantize_params(base_params, qcfg)
      apply = jax.jit(Transformer(qcfg).apply)
      nbytes = params_lib.weight_bytes(params, is_base)
    out = np.asarray(apply({"params": params}, batch["inputs"]), np.float64)
    rows.append({"format": fmt, "base_bytes": int(nbytes),
                 "bytes_vs_bf16": nbytes / (f32_bytes // 2), "float32_bytes": int(f32_bytes),
                 "logits_max_abs_err": float(np.abs(out - ref).max()),
                 "logits_mean_abs_err": float(np.abs(out - ref).mean()),
                 "logits_mean_abs": float(np.abs(ref).mean()),
                 "eval_loss": eval_loss(Transformer(qcfg), params, config)})
  return rows


def export_parity(name: str, model, params, out_dir: str) -> dict | None:
  try:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
  except ImportError:
    return None
  from ctxjax import hf  # noqa: PLC0415
  transformers.logging.set_verbosity_error()
  hf.save(model, {"params": params}, out_dir)
  hf_model = transformers.LlamaForCausalLM.from_pretrained(
      out_dir, attn_implementation="eager").eval()
  config = tiny_longlora.get_config("longlora")
  tokens = np.array(next(iter(batches(config, "validation")))["inputs"][:1])
  ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(tokens)).logits.float().numpy()
  return {"model": name, "tokens": int(tokens.size),
          "logits_max_abs_err": float(np.abs(ours - theirs).max()),
          "logits_mean_abs": float(np.abs(ours).mean())}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--pretrain_steps", type=int, default=150)
  parser.add_argument("--init_from", default="", help="a finished configs/tiny.py workdir")
  parser.add_argument("--finetune_steps", type=int, default=30)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "lora.json"))
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    if args.init_from:
      with open(os.path.join(args.init_from, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
      base_params = jax.tree.map(jnp.asarray, export_hf.read_workdir(args.init_from)[1]["params"])
      args.pretrain_steps = summary["steps"]
    else:
      summary, base_params = pretrain(os.path.join(tmp, "tiny"), args.pretrain_steps)
    print(f"pretrained {args.pretrain_steps} steps at T=256: eval_loss "
          f"{summary['eval_loss']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    rows, tuned = [], {}
    for variant in VARIANTS:
      row, params, model = finetune(variant, base_params, args.finetune_steps)
      rows.append(row)
      tuned[variant] = (model, params)
      print(json.dumps(row), flush=True)
    quant_rows = quantization_rows(base_params)
    parity = [p for p in (export_parity(v, *tuned[v], os.path.join(tmp, f"hf_{v}"))
                          for v in ("longlora", "nf4")) if p is not None]
  result = {
      "date": "2026-11-22", "machine": f"{platform.machine()} CPU x{os.cpu_count()} (shared)",
      "jax": jax.__version__, "command": " ".join(["python", *sys.argv]),
      "pretrain": {"config": "configs/tiny.py", "steps": args.pretrain_steps, "seq_len": 256,
                   "eval_loss": summary["eval_loss"], "workdir": args.init_from or "(temporary)"},
      "finetune": {"configs": "configs/tiny_longlora.py:<variant>", "steps": args.finetune_steps,
                   "seq_len": 1024, "batch_size": 2, "eval_batches": EVAL_BATCHES},
      "variants": rows, "quantization": quant_rows, "export_parity": parity,
      "wall_sec": time.time() - t0,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print_tables(result)


def print_tables(r: dict) -> None:
  full = next(v for v in r["variants"] if v["variant"] == "full")
  print("\n| variant | trainable params | % of full | optimizer state (KiB) | weights (KiB) | "
        "train loss first -> last 5 | eval loss T=1024 before -> after | s/step |")
  print("|---|---:|---:|---:|---:|---|---|---:|")
  for v in r["variants"]:
    print(f"| {v['variant']} | {v['params_trainable']:,} | "
          f"{100 * v['params_trainable'] / full['params_trainable']:.1f}% | "
          f"{v['opt_state_bytes'] / 1024:,.0f} | {v['param_bytes'] / 1024:,.0f} | "
          f"{v['train_loss_first']:.3f} -> "
          f"{v['train_loss_last5']:.3f} | {v['eval_loss_before']:.3f} -> "
          f"{v['eval_loss_after']:.3f} | {v['sec_per_step']:.2f} |")
  print("\n| frozen base | bytes | vs bf16 | logits max abs err | logits mean abs err | "
        "eval loss |")
  print("|---|---:|---:|---:|---:|---:|")
  for q in r["quantization"]:
    print(f"| {q['format']} | {q['base_bytes']:,} | {q['bytes_vs_bf16']:.3f} | "
          f"{q['logits_max_abs_err']:.4f} | {q['logits_mean_abs_err']:.5f} | "
          f"{q['eval_loss']:.4f} |")
  for p in r["export_parity"]:
    print(f"\nmerged export {p['model']}: max |logits ctxjax - transformers| = "
          f"{p['logits_max_abs_err']:.2e} over {p['tokens']} tokens")


if __name__ == "__main__":
  main()
