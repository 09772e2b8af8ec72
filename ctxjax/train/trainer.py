"""The training loop: config -> model, data, optimizer -> steps, metrics, summary.

One process, one device for now; sharding, multi-host, checkpoints and GrowLength stages build
on `make_train_step` in their own modules.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from ctxjax.model import Transformer, model_config_from_dict
from ctxjax.positions import schemes
from ctxjax.model.flops import param_count, train_flops_per_token
from ctxjax.train import data_sources, sharding
from ctxjax.train.checkpoint import Checkpointer, abstract_like
from ctxjax.train.metrics import MetricsWriter
from ctxjax.train.optim import make_optimizer
from ctxjax.train.step import init_state, make_eval_step, make_train_step


def _check_position_range(config, model_cfg):
  """Absolute tables have max_position_embeddings rows: refuse, before compiling, a run whose
  positions would index past them (inside jit the model cannot check values)."""
  scheme = schemes.get_scheme(model_cfg.position_embedding_type)
  if scheme.absolute is None:
    return
  if config.data.get("position_ids", "data") == "data":
    top, key = config.data.seq_len - 1, "data.seq_len"
  else:
    top, key = int(config.data.max_position_id) - 1, "data.max_position_id"
  if top >= model_cfg.max_position_embeddings:
    raise ValueError(f"{key} gives positions up to {top}, past the {scheme.name} table of "
                     f"model.max_position_embeddings={model_cfg.max_position_embeddings} rows")


def _validate(config):
  for key in ("steps", "log_every", "eval_batches"):
    value = config.train[key]
    if not isinstance(value, int) or value < (0 if key == "eval_batches" else 1):
      raise ValueError(f"train.{key} must be a positive integer, got {value!r}")
  for key in ("seq_len", "batch_size"):
    value = config.data[key]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"data.{key} must be a positive integer, got {value!r}")


def _progress(total: int):
  """A tqdm bar with ETA on a terminal; silent in logs/CI."""
  from tqdm import tqdm
  return tqdm(total=total, disable=not sys.stderr.isatty(), dynamic_ncols=True, unit="step")


def train(config, workdir: str) -> dict:
  """Train per `config`; writes config.json, metrics.jsonl, TensorBoard events and
  summary.json into `workdir`; returns the summary."""
  _validate(config)
  model_cfg = model_config_from_dict(config.model)
  _check_position_range(config, model_cfg)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))

  data = data_sources.build(config.data, model_cfg, seed=config.train.seed)
  model = Transformer(model_cfg)
  steps, seq_len, batch_size = config.train.steps, config.data.seq_len, config.data.batch_size
  tx, schedule = make_optimizer(config.optim, steps)
  mesh_cfg = config.get("mesh", None) or {}
  mesh, rules = sharding.create_mesh(mesh_cfg), sharding.logical_rules(mesh_cfg)
  sharding.check_batch_divisible(mesh, batch_size, seq_len)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  state, state_shardings = init_state(model, tx, jax.random.PRNGKey(config.train.seed),
                                      batch_size, seq_len, mesh=mesh, rules=rules)
  train_step = make_train_step(model, tx, config.data, mesh=mesh, rules=rules,
                               state_shardings=state_shardings)
  to_device = _batch_placer(mesh, rules)
  counts = param_count(model_cfg)
  flops_per_token = train_flops_per_token(model_cfg, seq_len)
  logging.info("model: %s parameters (%s in blocks); %.3g train FLOPs/token",
               f"{counts['total']:,}", f"{counts['blocks']:,}", flops_per_token)

  ckpt, start = None, 1
  meta = {"model_config": model_cfg.to_dict(), "seq_len": seq_len}
  if config.train.get("save_every", 0):
    ckpt = Checkpointer(workdir, save_every=config.train.save_every,
                        keep=config.train.get("keep_checkpoints", 3),
                        async_save=config.train.get("async_checkpoints", True))
    if ckpt.latest_step() is not None:
      state, data_state, _ = ckpt.restore(abstract_like(state, state_shardings),
                                          model_config=meta["model_config"])
      data.restore_train(data_state)
      start = int(state.step) + 1
      logging.info("resumed from %s at step %d", ckpt.directory, start - 1)

  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  batches = data.train_batches()
  bar = _progress(steps)
  bar.update(start - 1)
  history = []
  window_start, window_tokens = time.perf_counter(), 0
  compile_seconds = None
  for step in range(start, steps + 1):
    batch = to_device(next(batches))
    state, metrics = train_step(state, batch)
    window_tokens += batch_size * seq_len
    bar.update(1)
    if step == start or step % config.train.log_every == 0 or step == steps:
      loss = float(metrics["loss"])  # blocks: the window's time covers finished steps only
      if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step}")
      elapsed = time.perf_counter() - window_start
      record = {"loss": loss, "lr": float(schedule(step - 1)), "seq_len": seq_len,
                "tokens_per_sec": window_tokens / elapsed,
                "grad_norm": float(metrics["grad_norm"])}
      record["model_flops_per_sec"] = record["tokens_per_sec"] * flops_per_token
      if step == start:
        compile_seconds = elapsed
        record["compile_and_first_step_sec"] = elapsed
      writer.write(step, record)
      history.append({"step": step, **record})
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}")
      logging.info("step %d loss %.4f lr %.2e %.0f tok/s", step, loss, record["lr"],
                   record["tokens_per_sec"])
      window_start, window_tokens = time.perf_counter(), 0
    if ckpt is not None:
      stop = ckpt.preempted
      ckpt.save(step, state, data_state=data.train_state(), meta=meta,
                force=stop or step == steps)
      if stop:
        ckpt.close()
        logging.warning("stopped by a signal after step %d; the checkpoint is saved", step)
        raise SystemExit(1)
  bar.close()

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    eval_loss = evaluate(model, state.params, data, config.train.eval_batches, to_device)
  if ckpt is not None:
    ckpt.close()
  steady = [h["tokens_per_sec"] for h in history if h["step"] > start]
  summary = {
      "steps": steps, "seq_len": seq_len, "batch_size": batch_size,
      "params": counts["total"], "final_train_loss": history[-1]["loss"] if history else None,
      "eval_loss": eval_loss, "unigram_entropy": data.unigram_entropy(),
      "median_tokens_per_sec": float(np.median(steady)) if steady else None,
      "compile_and_first_step_sec": compile_seconds,
  }
  writer.write(steps, {"eval_loss": eval_loss, "unigram_entropy": summary["unigram_entropy"]})
  writer.close()
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return summary


def _batch_placer(mesh, rules):
  """Host numpy batch -> global arrays sharded over (data, fsdp) x context. Each process
  passes its own rows (multi-host: its slice of the global batch)."""
  shard = sharding.batch_sharding(mesh, rules)
  return lambda batch: {k: jax.make_array_from_process_local_data(shard, v)
                        for k, v in batch.items()}


def evaluate(model, params, data, num_batches: int, to_device=lambda b: b) -> float | None:
  """Token-weighted mean NLL over up to `num_batches` held-out batches."""
  if num_batches == 0:
    return None
  eval_step = make_eval_step(model)
  total, count = 0.0, 0.0
  for i, batch in enumerate(data.eval_batches()):
    if i >= num_batches:
      break
    nll, tokens = eval_step(params, to_device(batch))
    total, count = total + float(nll), count + float(tokens)
  return total / count if count else None
