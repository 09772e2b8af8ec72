"""Where one train step of configs/tiny.py spends its time, in ctxjax and in Hugging Face's
LlamaForCausalLM (PyTorch), on the shapes of benchmarks/throughput.py (2048 tokens per step).

  python benchmarks/profile_step.py [--seq_lens=256,1024] [--rounds=9]

Both sides are measured the same way, by removal, each side's variants timed in interleaved
rounds of their own (median; `_timed` says why the libraries are not interleaved), because
XLA:CPU runs a step as one program whose matmul thunks execute asynchronously, so a trace does
not attribute time per op:
  optimizer update    = step - value_and_grad (the same loss and gradients, no update)
  step without attention = the whole step with the attention kernel replaced by a cheap
                        stand-in that keeps q, k and v live (so RoPE and the projections stay;
                        on the PyTorch side it replaces scaled_dot_product_attention): what
                        either side would take if attention were free, so HF's step / ctxjax's
                        step without attention bounds ctxjax / HF from above whatever the
                        attention kernel does
  attention kernel    = step - step without attention
  backward (ctxjax)   = value_and_grad - forward (loss only)
PyTorch's loss + gradient time is also split by torch.profiler's self CPU time per aten op
(matmuls, attention, embedding, loss, norms + elementwise). The projection and lm_head GEMMs
are timed alone in each library (`gemm_rates`: forward X@W, dX = dY@W^T, dW = X^T@dY for every
weight, fp32): the step's matmul floor on this CPU for each side.
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
from ctxjax.xla_options import platform_options  # noqa: E402

STAND_IN = "profile_stand_in"


@api.register_implementation(STAND_IN)
def _stand_in(q, k, v, **_):
  """Not attention: v plus a negligible multiple of q and k, so that the projections and RoPE
  that feed the kernel (and their gradients) stay in the program."""
  return (v + 1e-30 * (q + k)).astype(q.dtype)


def _timed(fns: dict, rounds: int) -> dict:
  """Median seconds per call of each function (all of ONE library), in interleaved rounds.

  The two libraries are never interleaved: PyTorch's OpenMP workers, and XLA's, spin for a
  while after each parallel region, so a call made right after the other library's runs on a
  CPU still busy with them (measured: an XLA GEMM at about half its rate right after a PyTorch
  one). Each library's functions are timed in a block of their own, after two untimed calls each.
  """
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


def ctxjax_variants(seq_len: int) -> dict:
  """name -> a function running one step / value_and_grad / forward of ctxjax (module doc)."""
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

    if impl == "auto":
      options = platform_options()
      grad = jax.jit(jax.value_and_grad(loss_fn), compiler_options=options)
      params = jax.tree.map(jnp.copy, state.params)  # the step donates its state
      fns["grad"] = lambda g=grad, p=params: jax.block_until_ready(g(p))
      fwd = jax.jit(loss_fn, compiler_options=options)
      fns["forward"] = lambda f=fwd, p=params: jax.block_until_ready(f(p))
    step = make_train_step(model, tx, config.data)
    box = [state]

    def run(step=step, box=box, data=data):
      box[0], metrics = step(box[0], data)
      jax.block_until_ready(metrics)
    fns[f"step:{impl}"] = run
  return fns


def ctxjax_components(t: dict) -> dict:
  """Seconds per component from the timed variants of `ctxjax_variants`."""
  return {"step": t["step:auto"], "optimizer": t["step:auto"] - t["grad"],
          "attention_kernel": t["step:auto"] - t[f"step:{STAND_IN}"],
          "step_without_attention": t[f"step:{STAND_IN}"],
          "forward": t["forward"], "backward": t["grad"] - t["forward"]}


TORCH_GROUPS = (  # (group, substrings of aten op names), first match wins
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("embedding", ("embedding",)),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
)


def _torch_stand_in(q, k, v, *args, **kwargs):
  """The PyTorch twin of the ctxjax stand-in: v plus a negligible multiple of q and k."""
  return v + 1e-30 * (q + k)


def torch_variants(seq_len: int) -> tuple[dict, object] | None:
  """name -> a function running one step / loss + gradients of HF's model, and the step with
  the stand-in in place of torch's scaled_dot_product_attention; and the loss + gradient
  function for the profiler."""
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  m = tiny.get_config().model
  model = throughput.hf_llama(seq_len)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  tokens = torch.randint(0, m.vocab_size, (throughput.TOKENS_PER_STEP // seq_len, seq_len))
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def grad():
    model(input_ids=tokens, labels=tokens).loss.backward()

  def one():
    grad()
    opt.step()
    opt.zero_grad(set_to_none=True)

  def without_attention(fn):
    def run():
      torch.nn.functional.scaled_dot_product_attention = _torch_stand_in
      try:
        fn()
      finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return run

  def grad_only():
    grad()
    opt.zero_grad(set_to_none=True)
  return {"torch:step": one, "torch:grad": grad_only,
          "torch:step_without_attention": without_attention(one)}, grad_only


def torch_components(t: dict, grad_only, rounds: int) -> dict:
  """Seconds per component from the timed variants of `torch_variants`, with the loss +
  gradient time also split by torch.profiler's self time per aten op group (`profiled_*`)."""
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(rounds):
      grad_only()
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
  return {"step": t["torch:step"], "optimizer": t["torch:step"] - t["torch:grad"],
          "attention_kernel": t["torch:step"] - t["torch:step_without_attention"],
          "step_without_attention": t["torch:step_without_attention"],
          **{f"profiled_{g}": t["torch:grad"] * v / profiled for g, v in groups.items()}}


def gemm_rates(repeats: int = 15) -> dict:
  """fp32 rate of every projection / lm_head GEMM of a step (forward, dX, dW), alone, in XLA
  (with the steps' compiler options) and in PyTorch; and each side's sum over the step."""
  cfg = model_config_from_dict(tiny.get_config().model)
  n, d, f = throughput.TOKENS_PER_STEP, cfg.hidden_size, cfg.intermediate_size
  h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  weights = [("q,k,v", d, (h + 2 * kv) * hd), ("o", h * hd, d), ("gate,up", d, 2 * f),
             ("down", f, d)]
  weights = [(name, i, o, cfg.num_hidden_layers) for name, i, o in weights]
  weights.append(("lm_head", d, cfg.vocab_size, 1))
  try:
    import torch
  except ImportError:
    torch = None
  rng = np.random.default_rng(0)
  forms = {"forward": lambda x, w, dy: x @ w, "dX": lambda x, w, dy: dy @ w.T,
           "dW": lambda x, w, dy: x.T @ dy}
  rows, total = [], collections.Counter()
  options = platform_options()
  for name, d_in, d_out, count in weights:
    x, w, dy = (rng.standard_normal(s, np.float32) for s in ((n, d_in), (d_in, d_out), (n, d_out)))
    flops = 2 * n * d_in * d_out
    for form, fn in forms.items():
      jitted = jax.jit(fn, compiler_options=options)
      args = tuple(map(jnp.asarray, (x, w, dy)))
      t = _timed({"xla": lambda f=jitted, a=args: jax.block_until_ready(f(*a))}, repeats)
      if torch is not None:
        targs = tuple(map(torch.from_numpy, (x, w, dy)))
        t.update(_timed({"torch": lambda f=fn, a=targs: f(*a)}, repeats))
      row = {"weight": name, "shape": [d_in, d_out], "form": form, "count": count,
             **{f"{side}_gflops": flops / s / 1e9 for side, s in t.items()}}
      rows.append(row)
      for side, s in t.items():
        total[side] += count * s
  return {"rows": rows, "step_total_s": dict(total)}


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
  gemms = gemm_rates()
  result["gemms"] = gemms
  print(f"projection + lm_head GEMMs of one step, each timed alone: " + ", ".join(
      f"{side} {s * 1e3:.0f} ms" for side, s in gemms["step_total_s"].items()) +
      f" (at the 2048^3 matmul rate {peak / 1e9:.1f} GFLOP/s: {matmul_s * 1e3:.0f} ms)")
  for seq_len in [int(s) for s in args.seq_lens.split(",")]:
    t = _timed(ctxjax_variants(seq_len), args.rounds)
    torch_side = torch_variants(seq_len)
    if torch_side is not None:
      t.update(_timed(torch_side[0], args.rounds))
    row = {"seq_len": seq_len, "projection_matmuls_at_peak_s": matmul_s,
           "ctxjax": ctxjax_components(t),
           "torch": torch_components(t, torch_side[1], args.rounds) if torch_side else None}
    result["rows"].append(row)
    result["machine_after"] = measure.machine()
    measure.write_json(args.out, result)
    print(f"T={seq_len}:")
    for side in ("ctxjax", "torch"):
      parts = row[side]
      if not parts:
        continue
      print(f"  {side:7s} step {parts['step'] * 1e3:7.1f} ms | " + ", ".join(
          f"{k} {v * 1e3:.0f} ms ({v / parts['step']:.0%})" for k, v in parts.items()
          if k != "step"))
    if row["torch"]:
      hf_step = row["torch"]["step"]
      print(f"  ctxjax / HF: {hf_step / row['ctxjax']['step']:.2f}; with attention free on "
            f"ctxjax's side (HF's full step / ctxjax's step without attention): "
            f"{hf_step / row['ctxjax']['step_without_attention']:.2f}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
