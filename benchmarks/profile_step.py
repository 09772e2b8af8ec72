"""Where one train step of configs/tiny.py spends its time, in ctxjax and in Hugging Face's
LlamaForCausalLM (PyTorch), on the shapes of benchmarks/throughput.py (2048 tokens per step).

  python benchmarks/profile_step.py [--seq_lens=256,1024] [--rounds=9]

PyTorch: torch.profiler's self CPU time per aten op of the loss + gradients over `rounds`
steps, grouped into matmuls, attention (scaled_dot_product fwd + bwd), embedding, loss, and
norms + elementwise (the rest); the AdamW update by removal (step - loss + gradients). ctxjax: XLA:CPU runs a step as one program whose matmul thunks execute asynchronously,
so a trace does not attribute time per op reliably; the components are measured by removal
instead, each variant compiled on its own and timed in interleaved rounds (median):
  optimizer update    = step - value_and_grad (the same loss and gradients, no update)
  attention kernel    = value_and_grad - value_and_grad with the kernel replaced by a cheap
                        stand-in that keeps q, k and v live (so RoPE and the projections stay)
  backward            = value_and_grad - forward (loss only)
and the matmul share is each side's matmul FLOPs / the machine's measured fp32 matmul rate.
Writes benchmarks/results/profile_step.json.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import measure  # noqa: E402
import throughput  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from configs import tiny  # noqa: E402
from ctxjax.attention import api  # noqa: E402
from ctxjax.model import Transformer, model_config_from_dict  # noqa: E402
from ctxjax.model.flops import param_count  # noqa: E402
from ctxjax.train.optim import make_optimizer  # noqa: E402
from ctxjax.train.step import cross_entropy, init_state, make_train_step  # noqa: E402
from ctxjax.train.xla_options import step_compiler_options  # noqa: E402

STAND_IN = "profile_stand_in"


@api.register_implementation(STAND_IN)
def _stand_in(q, k, v, **_):
  """Not attention: v plus a negligible multiple of q and k, so that the projections and RoPE
  that feed the kernel (and their gradients) stay in the program."""
  return (v + 1e-30 * (q + k)).astype(q.dtype)


def _timed(fns: dict, rounds: int) -> dict:
  for f in fns.values():
    f()
    f()
  times = collections.defaultdict(list)
  for _ in range(rounds):
    for name, f in fns.items():
      start = time.perf_counter()
      f()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def ctxjax_components(seq_len: int, rounds: int) -> dict:
  """Seconds per step of the step, value_and_grad, forward, and value_and_grad with the
  attention kernel replaced (module docstring)."""
  batch = throughput.TOKENS_PER_STEP // seq_len
  fns = {}
  for impl in ("auto", STAND_IN):
    config = tiny.get_config()
    config.model.attention_impl = impl
    config.optim.warmup_steps = 0
    cfg = model_config_from_dict(config.model)
    model = Transformer(cfg)
    tx, _ = make_optimizer(config.optim, 100)
    state, _ = init_state(model, tx, jax.random.PRNGKey(0), batch, seq_len)
    data = throughput.random_batch(jax.random.PRNGKey(1), batch, seq_len, cfg.vocab_size)

    def loss_fn(params, model=model, data=data):
      logits = model.apply({"params": params}, data["inputs"], data["positions"],
                           data["segment_ids"])
      return cross_entropy(logits, data["targets"], data["loss_mask"])[0]

    options = step_compiler_options()
    grad = jax.jit(jax.value_and_grad(loss_fn), compiler_options=options)
    params = jax.tree.map(jnp.copy, state.params)  # the step donates its state
    fns[f"grad:{impl}"] = lambda g=grad, p=params: jax.block_until_ready(g(p))
    if impl == "auto":
      fwd = jax.jit(loss_fn, compiler_options=options)
      fns["forward"] = lambda f=fwd, p=params: jax.block_until_ready(f(p))
      step = make_train_step(model, tx, config.data)
      box = [state]

      def run(step=step, box=box, data=data):
        box[0], metrics = step(box[0], data)
        jax.block_until_ready(metrics)
      fns["step"] = run
  t = _timed(fns, rounds)
  return {"step": t["step"], "optimizer": t["step"] - t["grad:auto"],
          "attention_kernel": t["grad:auto"] - t[f"grad:{STAND_IN}"],
          "forward": t["forward"], "backward": t["grad:auto"] - t["forward"]}


TORCH_GROUPS = (  # (group, substrings of aten op names), first match wins
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("embedding", ("embedding",)),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
)


def torch_components(seq_len: int, rounds: int) -> dict | None:
  try:
    import torch
    from torch.profiler import ProfilerActivity, profile
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  m = tiny.get_config().model
  model = throughput.hf_llama(seq_len)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  tokens = torch.randint(0, m.vocab_size, (throughput.TOKENS_PER_STEP // seq_len, seq_len))

  def grad():
    model(input_ids=tokens, labels=tokens).loss.backward()

  def one():
    grad()
    opt.step()
    opt.zero_grad(set_to_none=True)

  t = _timed({"step": one, "grad": lambda: (grad(), opt.zero_grad(set_to_none=True))}, rounds)
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(rounds):
      grad()
      opt.zero_grad(set_to_none=True)
  groups = collections.Counter()
  for event in prof.key_averages():
    if not event.key.startswith("aten::"):
      continue
    group = next((g for g, keys in TORCH_GROUPS if any(k in event.key for k in keys)),
                 "norms+elementwise")
    groups[group] += event.self_cpu_time_total
  profiled = sum(groups.values())
  # the profiler's overhead inflates its total: each group's share of the profiled loss +
  # gradient time, scaled to that time measured without the profiler
  return {"step": t["step"], "optimizer": t["step"] - t["grad"],
          **{g: t["grad"] * v / profiled for g, v in groups.items()}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="256,1024")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "profile_step.json"))
  args = parser.parse_args()
  peak = throughput.matmul_peak_flops()
  result = {"started": measure.now(), "machine": measure.machine(), "rounds": args.rounds,
            "matmul_peak_flops": peak, "rows": []}
  cfg = model_config_from_dict(tiny.get_config().model)
  non_embed = param_count(cfg)["total"] - cfg.vocab_size * cfg.hidden_size
  matmul_s = 6 * non_embed * throughput.TOKENS_PER_STEP / peak  # projections + lm_head
  for seq_len in [int(s) for s in args.seq_lens.split(",")]:
    row = {"seq_len": seq_len, "projection_matmuls_at_peak_s": matmul_s,
           "ctxjax": ctxjax_components(seq_len, args.rounds),
           "torch": torch_components(seq_len, args.rounds)}
    result["rows"].append(row)
    result["machine_after"] = measure.machine()
    measure.write_json(args.out, result)
    print(f"T={seq_len}: projection + lm_head matmuls at the measured matmul rate "
          f"{peak / 1e9:.1f} GFLOP/s would take {matmul_s * 1e3:.0f} ms")
    for side in ("ctxjax", "torch"):
      parts = row[side]
      if not parts:
        continue
      print(f"  {side:7s} step {parts['step'] * 1e3:7.1f} ms | " + ", ".join(
          f"{k} {v * 1e3:.0f} ms ({v / parts['step']:.0%})" for k, v in parts.items()
          if k != "step"))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
