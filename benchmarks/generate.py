"""Decoding speed and cache memory vs context length: ctxjax.eval.generate against
transformers' `generate` on the same model (configs/tiny.py's shapes, random weights, made in
transformers, imported with ctxjax.hf.load), in the same run.

  python benchmarks/generate.py                          # T = 256, 1024, 4096, 16384
  python benchmarks/generate.py --lengths=256,1024 --rounds=2

Both decode greedily, batch 1, fp32, from the same random prompt of T tokens, `new` tokens
(64, 128 from T = 4096: the decode time must outweigh the prefill's noise on the transformers
side). Decode rate = (new - 1) / decode time: for ctxjax the time of generate's decode program
alone (ctxjax.eval.generation.compiled(...).decode, re-run on one prefilled cache), for transformers
time(generate new tokens) - time(generate 1 token) (the prefill and first token cancel). Best
of `rounds` per side, sides interleaved. Prefill: ctxjax's prefill program alone, compiled
(its first call, with the compile, is reported too), against transformers' generate of 1
token (the prefill and one sampling step). Cache memory: ctxjax's cache arrays after the run (KVCache.nbytes); transformers'
DynamicCache holds the same keys/values (2 x layers x T x kv_heads x head_dim x 4 bytes).
A row with an attention-sinks model (StreamingLLM: 4 sinks + a 1020-token window) shows the
bounded cache's constant memory. Writes benchmarks/results/generate.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import tiny  # noqa: E402
from ctxjax import hf  # noqa: E402
from ctxjax.eval import generation  # noqa: E402
from ctxjax.model import kv_cache  # noqa: E402
from ctxjax.attention.patterns import make_pattern  # noqa: E402
from ctxjax.model.transformer import Transformer  # noqa: E402

SINKS = dict(kind="attention_sinks", sink_size=4, window=1020)


def _hf_tiny(path, max_len):
  import torch
  import transformers
  m = tiny.get_model_config()
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
      num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim,
      max_position_embeddings=max_len, rms_norm_eps=m.rms_norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
      attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(path)
  return model


def _best(fn, rounds):
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def _rate(time_n, time_1, new):
  return (new - 1) / max(time_n - time_1, 1e-9)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lengths", default="256,1024,4096,16384")
  ap.add_argument("--new_tokens", type=int, default=64, help="doubled from T = 4096")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "generate.json"))
  args = ap.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  lengths = [int(x) for x in args.lengths.split(",")]
  tmp = tempfile.mkdtemp()
  torch_model = _hf_tiny(tmp, max(lengths) + 2 * args.new_tokens)
  model, variables = hf.load(tmp)
  sinks = Transformer(dataclasses.replace(model.cfg, attention_pattern=make_pattern(**SINKS)))
  cpu = subprocess.run(["bash", "-c", "lscpu | grep 'Model name'"], capture_output=True,
                       text=True).stdout.strip()
  rows = []
  for length in lengths:
    new = args.new_tokens if length < 4096 else 2 * args.new_tokens
    prompt = np.random.default_rng(length).integers(0, model.cfg.vocab_size, (1, length))
    prompt_t = torch.from_numpy(prompt.astype(np.int64))

    def hf_gen(n):
      with torch.no_grad():
        return torch_model.generate(prompt_t, do_sample=False, max_new_tokens=n,
                                    min_new_tokens=n, eos_token_id=None, pad_token_id=0,
                                    attention_mask=torch.ones_like(prompt_t))

    def jx_prefilled(m):
      """generate's two programs for `new` tokens, the prompt prefilled once: (prefill
      seconds, compile included; a prefill timer; a decode timer over the prefilled cache)."""
      program = generation.compiled(m, 1, length, new)
      args_ = (jnp.asarray(prompt, jnp.int32), jnp.array([length], jnp.int32),
               jax.random.PRNGKey(0))
      unrolled = jax.block_until_ready(program.unroll(variables))
      began = time.perf_counter()
      state = jax.block_until_ready(program.prefill(unrolled, *args_))
      prefill_s = time.perf_counter() - began

      def prefill():  # compiled by now: the prefill alone
        return jax.block_until_ready(program.prefill(unrolled, *args_))

      def decode():  # the cache is not donated: every call decodes from the same state
        return jax.block_until_ready(program.decode(unrolled, *args_[1:], *state))
      return prefill_s, prefill, decode

    # The first prefill and decode calls compile; the timed ones reuse the programs and the
    # decode reuses the same prefilled cache.
    (jx_pre, jx_prefill, jx_decode), (_, _, sk_decode) = jx_prefilled(model), jx_prefilled(sinks)
    tokens = np.concatenate([prompt, np.asarray(jx_decode())], axis=1)
    sk_decode()
    same = np.array_equal(tokens, hf_gen(new).numpy())
    t = {}
    for _ in range(args.rounds):  # interleaved: each side sees the same machine state
      t.setdefault("hf1", []).append(_best(lambda: hf_gen(1), 1))
      t.setdefault("jx1", []).append(_best(jx_prefill, 1))
      t.setdefault("hfn", []).append(_best(lambda: hf_gen(new), 1))
      t.setdefault("jxn", []).append(_best(jx_decode, 1))
      t.setdefault("skn", []).append(_best(sk_decode, 1))
    t = {k: min(v) for k, v in t.items()}
    cap, n_first = kv_cache.cache_capacity(model.cfg, length + new)
    cache_bytes = kv_cache.init_cache(model.cfg, 1, cap, n_first=n_first).nbytes()
    scap, sfirst = kv_cache.cache_capacity(sinks.cfg, length + new)
    sink_bytes = kv_cache.init_cache(sinks.cfg, 1, scap, n_first=sfirst).nbytes()
    c = model.cfg
    hf_bytes = 2 * c.num_hidden_layers * (length + new) * c.num_key_value_heads * c.head_dim * 4
    row = dict(length=length, new_tokens=new, same_tokens_as_hf=bool(same),
               hf_prefill_s=t["hf1"], ctxjax_prefill_s=t["jx1"],
               ctxjax_prefill_and_compile_s=jx_pre,
               hf_decode_tok_s=_rate(t["hfn"], t["hf1"], new),
               ctxjax_decode_tok_s=(new - 1) / t["jxn"],
               sinks_decode_tok_s=(new - 1) / t["skn"],
               ctxjax_cache_mib=cache_bytes / 2 ** 20, hf_cache_mib=hf_bytes / 2 ** 20,
               sinks_cache_mib=sink_bytes / 2 ** 20)
    row["ratio"] = row["ctxjax_decode_tok_s"] / row["hf_decode_tok_s"]
    rows.append(row)
    print(f"T={length:6d}  decode tok/s: ctxjax {row['ctxjax_decode_tok_s']:7.1f}  "
          f"transformers {row['hf_decode_tok_s']:7.1f}  ratio {row['ratio']:.2f}x  "
          f"sinks {row['sinks_decode_tok_s']:7.1f} | cache MiB {row['ctxjax_cache_mib']:.2f} "
          f"(hf {row['hf_cache_mib']:.2f}, sinks {row['sinks_cache_mib']:.2f}) | prefill s "
          f"{row['ctxjax_prefill_s']:.3f} ({jx_pre:.3f} with compile) vs "
          f"{row['hf_prefill_s']:.3f} | same tokens {same}",
          flush=True)
    _write(args.out, cpu, rows, torch.__version__)  # per length: a stopped run keeps its rows
  print(f"{cpu}; wrote {args.out}")


def _write(path, cpu, rows, torch_version):
  result = dict(date=datetime.datetime.now().isoformat(timespec="minutes"), cpu=cpu,
                cores=os.cpu_count(), platform=platform.platform(), jax=jax.__version__,
                torch=torch_version, rows=rows,
                target="ctxjax decode tokens/s >= 2x transformers at every length")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
