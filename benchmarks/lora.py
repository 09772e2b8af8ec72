"""LoRA / LongLoRA / LongQLoRA on the tiny model (configs/tiny.py: d 256, 4 layers, vocab 1024).

  python benchmarks/lora.py [--pretrain_steps=150] [--finetune_steps=30] [--init_from=WORKDIR]
      [--seeds=0,1,2] [--lrs=full:3e-4/1e-3,lora:1e-3/3e-3,...] [--quant_targets=qkvo]

1. Pretrain configs/tiny.py (T=256) with ctxjax.train.trainer.train into a temporary workdir
   (or take --init_from, a finished configs/tiny.py run) and read its parameters back from the
   trainer's checkpoint (export_hf.read_workdir).
2. Fine-tune each variant of configs/tiny_longlora.py (full, lora, longlora, int8, nf4) from
   those parameters at T=1024 (linear PI x4, S2-Attn in training) with the same optimizer
   settings but the learning rate, for every learning rate of the variant's small sweep and
   every seed (train.seed: adapter init and batch order), interleaved: seed by seed, each
   variant and rate in turn, so load changes fall on every variant. Gradients of the trainable
   leaves only (ctxjax.train.trainable.value_and_grad). With --quant_targets=qkvo (default)
   int8 / nf4 put their adapters where longlora does (q,k,v,o), so the frozen base's storage is
   the only difference; `all` keeps LongQLoRA's adapters on all 7 projections. Reported per
   run: trainable parameters, bytes of the optimizer state's leaves, train loss (first step,
   mean of the last 5), held-out loss at T=1024 with full attention, seconds per step (CPU;
   noisy); per variant and rate, the mean and spread over seeds.
3. Frozen base of the block projections stored as bf16 / int8 / NF4: bytes, and the logits
   error each introduces vs the float32 pretrained model (max abs, mean abs) on held-out rows.
4. Merged export parity: the first seed's fine-tuned longlora and nf4 models saved with
   ctxjax.hf.save (adapters merged, NF4 dequantized) and loaded with transformers'
   LlamaForCausalLM: max abs logits difference vs the ctxjax adapter model (needs the hf
   extra; skipped without it).
Writes benchmarks/results/lora.json after every fine-tuning run and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import logging  # noqa: E402

import measure  # noqa: E402  (benchmarks/measure.py)
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
# The sweep: full fine-tuning moves every weight, so it gets lower rates than the adapters
# (LoRA, Hu et al. 2021, tunes its rate apart from full fine-tuning's).
LRS = "full:3e-4/1e-3,lora:1e-3/3e-3,longlora:1e-3/3e-3,int8:1e-3/3e-3,nf4:1e-3/3e-3"


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


_EVAL_STEPS: dict = {}
_BEFORE: dict = {}  # (variant, quant_targets, seed) -> held-out loss before fine-tuning


def eval_loss(model, params, config) -> float:
  if model.cfg not in _EVAL_STEPS:  # compiled once per model config
    _EVAL_STEPS[model.cfg] = make_eval_step(model)
  nll = _EVAL_STEPS[model.cfg]
  total = count = 0.0
  for i, batch in enumerate(batches(config, "validation")):
    if i == EVAL_BATCHES:
      break
    a, b = nll(params, batch)
    total, count = total + float(a), count + float(b)
  return total / count


def variant_config(variant: str, quant_targets: str, lr: float, seed: int):
  config = tiny_longlora.get_config(variant)
  if quant_targets == "qkvo" and config.model.base_quantization != "none":
    config.model.lora_targets = tiny_longlora.QKVO  # adapters where longlora has them
  config.optim.learning_rate = lr
  config.train.seed = seed
  return config


_STEPS: dict = {}
_BEFORE: dict = {}  # (variant, quant_targets, seed) -> held-out loss before fine-tuning


def compiled_step(key, model, tx, mask):
  """One jitted train step per (variant, rate): seeds reuse it (same shapes, same optimizer)."""
  if key not in _STEPS:
    def loss_fn(p, batch):
      logits = model.apply({"params": p}, batch["inputs"], batch["positions"],
                           batch["segment_ids"], train=True)
      return cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

    @jax.jit
    def step(p, opt_state, batch):
      loss, grads = trainable.value_and_grad(loss_fn, mask)(p, batch)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss

    _STEPS[key] = (step, jax.jit(tx.init))
  return _STEPS[key]


def finetune(variant: str, base_params, steps: int, *, lr: float, seed: int,
             quant_targets: str) -> tuple[dict, dict, object]:
  config = variant_config(variant, quant_targets, lr, seed)
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps)
  cfg = model_config_from_dict(config.model)
  model = Transformer(cfg)
  params = params_lib.init_from_base(base_params, cfg, jax.random.PRNGKey(seed))
  tx, _ = make_optimizer(config.optim, steps)
  mask = trainable.trainable_mask(params, list(config.optim.trainable))
  step, init = compiled_step((variant, quant_targets, lr, steps), model, tx, mask)
  opt_state = init(params)
  flat_mask = params_lib.flatten(mask)
  row = {
      "variant": variant, "learning_rate": lr, "seed": seed, "began": measure.now(),
      "loadavg_before": list(os.getloadavg()), "lora_rank": cfg.lora_rank,
      "lora_targets": list(cfg.lora_targets) if cfg.lora_rank else [],
      "base_quantization": cfg.base_quantization, "trainable": list(config.optim.trainable),
      "params_trainable": sum(int(np.size(x)) for p, x in params_lib.flatten(params).items()
                              if flat_mask[p]),
      "opt_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(opt_state))),
      "param_bytes": params_lib.weight_bytes(params),  # all parameters, as stored
  }
  # The same for every rate (the rate does not enter the model before a step): computed once.
  key = (variant, quant_targets, seed)
  if key not in _BEFORE:
    _BEFORE[key] = eval_loss(model, params, config)
  row["eval_loss_before"] = _BEFORE[key]
  losses, times = [], []
  data = batches(config, "train")
  for _ in range(steps):
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, next(data))
    losses.append(float(loss))  # blocks
    times.append(time.perf_counter() - start)
  row.update(train_loss_first=losses[0], train_loss_last5=float(np.mean(losses[-5:])),
             eval_loss_after=eval_loss(model, params, config),
             sec_per_step=float(np.median(times[1:])), first_step_sec=times[0])
  return row, params, model


def parse_lrs(text: str, variants) -> dict[str, list[float]]:
  """"full:3e-4/1e-3,lora:1e-3" -> {variant: [rates]}; every variant run needs its rates."""
  lrs = {}
  for item in filter(None, text.split(",")):
    name, _, rates = item.partition(":")
    lrs[name.strip()] = [float(r) for r in rates.split("/")]
  missing = [v for v in variants if v not in lrs]
  if missing:
    raise SystemExit(f"--lrs has no rates for {missing}; e.g. --lrs={LRS}")
  return lrs


def summarize(rows: list[dict]) -> list[dict]:
  """Per (variant, rate): mean and spread over seeds; `best` marks each variant's rate with the
  lowest mean held-out loss (chosen on the held-out batches themselves: a small optimism)."""
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault((r["variant"], r["learning_rate"]), []).append(r)
  out = []
  for (variant, lr), rs in groups.items():
    out.append({"variant": variant, "learning_rate": lr, "seeds": [r["seed"] for r in rs],
                "params_trainable": rs[0]["params_trainable"],
                "opt_state_bytes": rs[0]["opt_state_bytes"], "param_bytes": rs[0]["param_bytes"],
                "lora_targets": rs[0]["lora_targets"],
                **{k: measure.spread(r[k] for r in rs) for k in (
                    "eval_loss_before", "eval_loss_after", "train_loss_first",
                    "train_loss_last5", "sec_per_step")}})
  for variant in {s["variant"] for s in out}:
    mine = [s for s in out if s["variant"] == variant]
    best = min(mine, key=lambda s: s["eval_loss_after"]["mean"])
    for s in mine:
      s["best"] = s is best
  return out


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
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--lrs", default=LRS, help="variant:rate/rate,... (every variant)")
  parser.add_argument("--quant_targets", choices=("qkvo", "all"), default="qkvo",
                      help="int8/nf4 adapters: qkvo (as longlora) or all 7 projections")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "lora.json"))
  args = parser.parse_args()
  variants = args.variants.split(",")
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown or "full" not in variants:
    raise SystemExit(f"--variants={args.variants}: choose from {VARIANTS}, with full (the "
                     "baseline of the table)")
  lrs, seeds = parse_lrs(args.lrs, variants), [int(s) for s in args.seeds.split(",")]
  logging.set_verbosity(logging.WARNING)
  t0 = time.time()
  result = {"date": measure.now(), "machine": measure.machine(), "jax": jax.__version__,
            "command": " ".join(["python", *sys.argv])}
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
    result.update(
        pretrain={"config": "configs/tiny.py", "steps": args.pretrain_steps, "seq_len": 256,
                  "eval_loss": summary["eval_loss"], "workdir": args.init_from or "(temporary)"},
        finetune={"configs": "configs/tiny_longlora.py:<variant>", "steps": args.finetune_steps,
                  "seq_len": 1024, "batch_size": 2, "eval_batches": EVAL_BATCHES,
                  "seeds": seeds, "variants": variants, "learning_rates": lrs,
                  "quant_targets": args.quant_targets},
        quantization=quantization_rows(base_params), variants=[], summary=[], export_parity=[])
    measure.write_json(args.out, result)
    for i, seed in enumerate(seeds):
      tuned = {}
      for variant in variants:
        for lr in lrs[variant]:
          row, params, model = finetune(variant, base_params, args.finetune_steps, lr=lr,
                                        seed=seed, quant_targets=args.quant_targets)
          tuned.setdefault(variant, (model, params))  # the variant's first rate
          result["variants"].append(row)
          result.update(summary=summarize(result["variants"]), wall_sec=time.time() - t0,
                        finished=measure.now(), machine_after=measure.machine())
          measure.write_json(args.out, result)
          print(json.dumps(row), flush=True)
      if i == 0:
        result["export_parity"] = [
            p for p in (export_parity(v, *tuned[v], os.path.join(tmp, f"hf_{v}"))
                        for v in ("longlora", "nf4") if v in tuned) if p is not None]
        measure.write_json(args.out, result)
  print_tables(result)


def print_tables(r: dict) -> None:
  full = next(v for v in r["summary"] if v["variant"] == "full")
  f = measure.fmt
  print("\n| variant | lr | trainable params | % of full | optimizer state (KiB) | weights (KiB) |"
        " train loss last 5 | eval loss T=1024 before | after | s/step |")
  print("|---|---:|---:|---:|---:|---:|---|---|---|---:|")
  for v in r["summary"]:
    lr = f"**{v['learning_rate']:g}**" if v["best"] else f"{v['learning_rate']:g}"
    print(f"| {v['variant']} | {lr} | {v['params_trainable']:,} | "
          f"{100 * v['params_trainable'] / full['params_trainable']:.1f}% | "
          f"{v['opt_state_bytes'] / 1024:,.0f} | {v['param_bytes'] / 1024:,.0f} | "
          f"{f(v['train_loss_last5'])} | {f(v['eval_loss_before'])} | "
          f"{f(v['eval_loss_after'])} | {v['sec_per_step']['mean']:.2f} |")
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
