"""The training loop: config -> model, data, optimizer -> steps, metrics, summary.

The config is validated once into typed sections (config.py: run_config). Sharding comes from
config.mesh (sharding.py), progressive stages from config.stages (stages.py), checkpoints and
resume from config.train.save_every (checkpoint.py), in-training evaluation from config.eval
through the `make_evaluator` the command hands in (ctxjax/eval/during_training.py: train never
imports eval).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from ctxjax import storage
from ctxjax.data import registry as data_registry
from ctxjax.data.config import DataConfig
from ctxjax.model import Transformer
from ctxjax.positions import schemes
from ctxjax.model.flops import param_count, train_flops_per_token
from ctxjax.train import sharding
from ctxjax.train import stages as stages_lib
from ctxjax.train.checkpoint import Checkpointer, abstract_like, checkpoint_dir
from ctxjax.train.checkpoint_faults import check_writable
from ctxjax.train.config import RunConfig, run_config
from ctxjax.train.init_from import initial_params
from ctxjax.train.metrics import MetricsWriter
from ctxjax.train.optim import make_optimizer
from ctxjax.train.step import init_state, make_eval_step, make_train_step, vouches_for_positions


def _splash_hint(run) -> str:
  """Why a loss may be NaN on a TPU: `auto` runs splash for packed data and gives NaN outputs for
  a batch whose positions do not step by 1 within each segment (attention/fused.py)."""
  if (jax.default_backend() != "tpu" or run.model_cfg.attention_impl != "auto"
      or not vouches_for_positions(run.data_cfg)):
    return ""
  return (" (on a TPU, model.attention_impl=auto runs splash attention on packed data and "
          "gives NaN for a batch whose positions do not step by 1 within each segment: check "
          "the data source's positions, or set --config.model.attention_impl=blockwise)")


def _check_position_range(data: DataConfig, seq_len: int, model_cfg):
  """Absolute tables have max_position_embeddings rows: refuse, before compiling, a run whose
  positions would index past them (inside jit the model cannot check values)."""
  scheme = schemes.get_scheme(model_cfg.position_embedding_type)
  if scheme.absolute is None:
    return
  if data.position_ids == "data" and data.packed_positions == "per_document":
    # per_document continues a long document's offsets across rows: unbounded positions.
    raise ValueError(f"data.packed_positions='per_document' gives a long document's true "
                     f"offsets, past the {scheme.name} table of model.max_position_embeddings="
                     f"{model_cfg.max_position_embeddings} rows; set "
                     f"data.packed_positions='continuous' (every row 0..seq_len-1)")
  if data.position_ids == "data":
    top, key = seq_len - 1, "data.seq_len"
  else:
    top, key = data.max_position_id - 1, "data.max_position_id"
  if top >= model_cfg.max_position_embeddings:
    raise ValueError(f"{key} gives positions up to {top}, past the {scheme.name} table of "
                     f"model.max_position_embeddings={model_cfg.max_position_embeddings} rows")


def _progress(total: int):
  """A tqdm bar with ETA on a terminal; silent in logs/CI."""
  from tqdm import tqdm
  return tqdm(total=total, disable=not sys.stderr.isatty(), dynamic_ncols=True, unit="step")


class _Run:
  """What one stage needs: its model, data, compiled step and batch placer."""

  def __init__(self, cfg: RunConfig, stage, model_cfg, tx, mesh, rules, state_shardings,
               workdir):
    self.stage = stage
    self.model_cfg = model_cfg
    self.model = Transformer(model_cfg)
    accum = cfg.train.grad_accum_steps
    if stage.batch_size % accum:
      raise ValueError(f"the batch of {stage.batch_size} rows (stage {stage.index}) is not "
                       f"divisible by train.grad_accum_steps={accum}")
    sharding.check_batch_divisible(mesh, stage.batch_size // accum, stage.seq_len)
    # Multi-host: this process reads rows [shard * B/count, (shard+1) * B/count) only.
    shard, count, self.columns = sharding.process_batch_block(mesh, rules, stage.batch_size,
                                                              stage.seq_len)
    data_cfg = dataclasses.replace(cfg.data, seq_len=stage.seq_len, batch_size=stage.batch_size,
                                   process_index=shard, process_count=count)
    if jax.process_index() == 0 and not data_cfg.workdir:
      # where a source writes its statistics (mixture_stats.json)
      data_cfg = dataclasses.replace(data_cfg, workdir=workdir)
    self.data_cfg = data_cfg
    self.data = data_registry.build(data_cfg, model_cfg, seed=cfg.train.seed)
    self.step = make_train_step(self.model, tx, data_cfg, mesh=mesh, rules=rules,
                                state_shardings=state_shardings, grad_accum_steps=accum,
                                trainable=cfg.optim.trainable or None)
    self.to_device = _batch_placer(mesh, rules, self.columns)
    self.flops_per_token = train_flops_per_token(model_cfg, stage.seq_len)


@dataclasses.dataclass
class StageLoop:
  """What walking one stage's steps needs besides the state (shared by a run's stages but
  `run` and `start`)."""
  run: _Run                  # the stage's model, data, compiled step and batch placer
  start: int                 # the first global step to take in this stage (1-based)
  log_every: int
  schedule: Callable[[int], Any]  # the one learning-rate schedule across all stages
  writer: MetricsWriter
  bar: Any                   # tqdm progress bar
  ckpt: Checkpointer | None
  history: list              # logged records, appended to
  evaluate: Callable | None = None  # (step, model, params) -> scalars; None: no config.eval
  eval_every: int = 0
  final_step: int = 0        # the run's last step: evaluated whatever eval_every says
  last_eval: dict = dataclasses.field(default_factory=dict)  # the latest eval scalars


def _stage_model_config(cfg: RunConfig, stage):
  model_cfg = stages_lib.stage_model_config(cfg.model, stage)
  _check_position_range(cfg.data, stage.seq_len, model_cfg)
  return model_cfg


def _eval_wanted(cfg: RunConfig, make_evaluator) -> bool:
  if not cfg.eval.every:
    return False
  if make_evaluator is None:
    raise ValueError("config.eval.every is set but train() got no make_evaluator: pass "
                     "ctxjax.eval.during_training.make_evaluator (python -m ctxjax.train does)")
  if jax.process_count() > 1:
    logging.warning("config.eval is skipped: in-training evaluation runs in single-process "
                    "runs only; evaluate the checkpoints with python -m ctxjax.evaluate")
    return False
  return True


def train(config, workdir: str, *, make_evaluator: Callable | None = None) -> dict:
  """Train per `config`; writes config.json, metrics.jsonl, TensorBoard events, checkpoints and
  summary.json into `workdir` (resuming from its newest checkpoint); returns the summary.
  `make_evaluator(eval_cfg, data_cfg=, model_cfg=, train_length=)` -> `(step, model, params)
  -> {name: float}` runs config.eval (ctxjax/eval/during_training.py)."""
  cfg = run_config(config)  # every section validated once, before anything is built
  eval_on = _eval_wanted(cfg, make_evaluator)
  all_stages = stages_lib.resolve_stages(cfg)
  stage_cfgs = [_stage_model_config(cfg, s) for s in all_stages]  # validate all up front
  storage.makedirs(workdir)
  if cfg.train.save_every:  # an unwritable directory fails now, not in a background save
    check_writable(checkpoint_dir(workdir))
  lead = jax.process_index() == 0  # metrics and summaries are written once

  steps = stages_lib.total_steps(all_stages)
  tx, schedule = make_optimizer(cfg.optim, steps)  # one schedule across all stages
  mesh, rules = sharding.create_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh)
  logging.info("mesh %s over %d devices; %d stage(s), %d steps", dict(mesh.shape), mesh.size,
               len(all_stages), steps)
  first = all_stages[0]
  state, state_shardings = init_state(Transformer(stage_cfgs[0]), tx,
                                      jax.random.PRNGKey(cfg.train.seed), first.batch_size,
                                      first.seq_len, mesh=mesh, rules=rules)
  counts = param_count(stage_cfgs[0])
  logging.info("model: %s parameters (%s in blocks)", f"{counts['total']:,}",
               f"{counts['blocks']:,}")

  ckpt, start, data_state = None, 1, None
  meta = {"model_config": stage_cfgs[0].to_dict()}
  if cfg.train.save_every:
    ckpt = Checkpointer(workdir, save_every=cfg.train.save_every,
                        keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpoints)
    if ckpt.latest_step() is not None:
      state, saved, _ = ckpt.restore(abstract_like(state, state_shardings),
                                     model_config=meta["model_config"])
      start = int(state.step) + 1
      # Data state is per stage: it resumes only inside the stage it was saved in.
      if saved.get("stage") == stages_lib.stage_of(all_stages, start).index:
        data_state = saved["data"]
      logging.info("resumed from %s at step %d", ckpt.directory, start - 1)
  previous = _nothing_to_train(workdir, start - 1, steps)
  if previous is not None:
    ckpt.close()
    return previous
  if lead:  # only now: a refused resume leaves the run's config.json as it was
    storage.write_text(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  if start == 1:  # a fresh run (not a resume) may start from other parameters
    state = state.replace(params=initial_params(cfg.train, state.params,
                                                state_shardings.params, stage_cfgs[0]))

  writer = MetricsWriter(workdir, enabled=lead)
  bar = _progress(steps)
  bar.update(start - 1)
  history, run, last_eval = [], None, {}
  evaluate_fn = make_evaluator(cfg.eval, data_cfg=cfg.data, model_cfg=stage_cfgs[-1],
                               train_length=max(s.seq_len for s in all_stages)
                               ) if eval_on else None  # bad eval settings fail before step 1
  for stage, model_cfg in zip(all_stages, stage_cfgs):
    if stage.last_step < start:
      continue
    run = _Run(cfg, stage, model_cfg, tx, mesh, rules, state_shardings,
               workdir)  # compiles once
    if data_state is not None:
      run.data.restore_train(data_state)
      data_state = None
    loop = StageLoop(run=run, start=max(start, stage.first_step),
                     log_every=cfg.train.log_every, schedule=schedule, writer=writer, bar=bar,
                     ckpt=ckpt, history=history, evaluate=evaluate_fn,
                     eval_every=cfg.eval.every, final_step=steps, last_eval=last_eval)
    state = _train_stage(loop, state)
  bar.close()

  if run is None:  # resumed after the last step: evaluate with the last stage's shapes
    run = _Run(cfg, all_stages[-1], stage_cfgs[-1], tx, mesh, rules, state_shardings,
               workdir)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    eval_loss = evaluate(run.model, state.params, run.data, cfg.train.eval_batches,
                         run.to_device)
  if ckpt is not None:
    ckpt.close()
  steady = [h["tokens_per_sec"] for h in history if not h.get("first_of_stage")]
  summary = {
      "steps": steps, "stages": len(all_stages), "seq_len": run.stage.seq_len,
      "batch_size": run.stage.batch_size, "params": counts["total"],
      "final_train_loss": history[-1]["loss"] if history else None,
      "eval_loss": eval_loss, "unigram_entropy": run.data.unigram_entropy(),
      "median_tokens_per_sec": float(np.median(steady)) if steady else None,
      "compile_and_first_step_sec": next(
          (h["compile_and_first_step_sec"] for h in history if h.get("first_of_stage")), None),
  }
  if last_eval:
    summary["eval"] = last_eval
  quality = getattr(run.data, "data_quality", None)  # skipped/repaired input (data.jsonl)
  if quality is not None and quality():
    summary["data_quality"] = quality()
  writer.write(steps, {"eval_loss": eval_loss, "unigram_entropy": summary["unigram_entropy"]})
  writer.close()
  if lead:
    storage.write_text(storage.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  return summary


def _nothing_to_train(workdir: str, done: int, steps: int) -> dict | None:
  """The run's previous summary (or {}) when its checkpoint is at step `done` >= train.steps:
  no step is left to take, so its records (config.json, metrics.jsonl, summary.json) stay as
  they were (a step-`done` model's eval is never logged under step `steps`). None when there
  are steps to take, or when a finished run lacks its summary (stopped after its last
  checkpoint): its eval and summary.json are then written as usual."""
  path = storage.join(workdir, "summary.json")
  if done < steps or (done == steps and not storage.exists(path)):
    return None
  logging.warning("nothing to train: the checkpoint in %s is at step %d, %s; "
                  "config.json, metrics.jsonl and summary.json are left as they were (raise "
                  "train.steps to train on)", workdir, done,
                  f"the train.steps={steps} of a finished run" if done == steps
                  else f"past train.steps={steps}")
  if not storage.exists(path):
    return {}
  return storage.read_json(path)


def _train_stage(loop: StageLoop, state):
  """Steps loop.start..loop.run.stage.last_step; logs, checkpoints, stops cleanly on a
  signal."""
  run, start, writer, bar, ckpt, history = (loop.run, loop.start, loop.writer, loop.bar,
                                            loop.ckpt, loop.history)
  stage, to_device = run.stage, run.to_device
  tokens_per_step = stage.batch_size * stage.seq_len
  batches = run.data.train_batches()
  window_start, window_tokens = time.perf_counter(), 0
  for step in range(start, stage.last_step + 1):
    state, metrics = run.step(state, to_device(next(batches)))
    window_tokens += tokens_per_step
    bar.update(1)
    if step == start or step % loop.log_every == 0 or step == stage.last_step:
      loss = float(metrics["loss"])  # blocks: the window's time covers finished steps only
      if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step}" + _splash_hint(run))
      elapsed = time.perf_counter() - window_start
      record = {"loss": loss, "lr": float(loop.schedule(step - 1)), "seq_len": stage.seq_len,
                "batch_size": stage.batch_size, "stage": stage.index,
                "tokens_per_sec": window_tokens / elapsed,
                "grad_norm": float(metrics["grad_norm"])}
      record["model_flops_per_sec"] = record["tokens_per_sec"] * run.flops_per_token
      if step == start:
        record["compile_and_first_step_sec"] = elapsed
      writer.write(step, record)
      history.append({"step": step, **record, "first_of_stage": step == start})
      bar.set_postfix(stage=stage.index, loss=f"{loss:.3f}",
                      tok_s=f"{record['tokens_per_sec']:.0f}")
      logging.info("step %d stage %d T=%d loss %.4f lr %.2e %.0f tok/s", step, stage.index,
                   stage.seq_len, loss, record["lr"], record["tokens_per_sec"])
      window_start, window_tokens = time.perf_counter(), 0
    if loop.evaluate is not None and (step % loop.eval_every == 0 or step == loop.final_step):
      # the evaluation's time is not training time: the throughput window skips it
      window_start += _evaluate_during_training(loop, step, state)
    if ckpt is not None:
      stop = ckpt.preempted
      ckpt.save(step, state, data_state={"stage": stage.index, "data": run.data.train_state()},
                meta={"model_config": run.model_cfg.to_dict()},
                force=stop or step == stage.last_step)
      if stop:
        ckpt.close()
        logging.warning("stopped by a signal after step %d; the checkpoint is saved", step)
        raise SystemExit(1)
  return state


def _evaluate_during_training(loop: StageLoop, step: int, state) -> float:
  """config.eval's tasks on the current parameters, logged at `step` (single-process runs:
  see _eval_wanted); returns the seconds it took."""
  began = time.perf_counter()
  scalars = loop.evaluate(step, loop.run.model, state.params)
  scalars["eval/seconds"] = time.perf_counter() - began
  loop.writer.write(step, scalars)
  loop.last_eval.clear()
  loop.last_eval.update(scalars)
  logging.info("step %d eval %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
  return scalars["eval/seconds"]


def _batch_placer(mesh, rules, columns=slice(None)):
  """Host numpy batch -> global arrays sharded over (data, fsdp) x context. Each process
  passes its own rows (multi-host: its row block of the global batch, and of those only its
  `columns` when the context axis spans hosts)."""
  shard = sharding.batch_sharding(mesh, rules)
  return lambda batch: {k: jax.make_array_from_process_local_data(shard, v[:, columns])
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
