"""The study's plan: which models are trained and evaluated, from configs/study.py.

A plan is a list of `Item`s, each one process's work: `train` items produce a training workdir
under DIR/runs/<name>, `eval` items an evaluation under DIR/evals/<name>. `after` names the
items an item needs (an extension starts from the pretrained RoPE model; an evaluation reads
its model). The plan is a pure function of the study config, so every process of a study (the
scheduler and each item's worker) rebuilds the same plan from DIR/study.json.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import ml_collections


@dataclasses.dataclass(frozen=True)
class Item:
  name: str                 # "<kind>:<model>", e.g. "train:extend_pi", "eval:zeroshot_yarn"
  kind: str                 # "train" | "eval"
  model: str                # the run (train) or evaluated model (eval) name
  group: str                # pretrain | growlength | extend | zeroshot | mixture
  after: tuple[str, ...] = ()
  cost: float = 1.0         # relative weight for the progress bar
  overrides: Any = None     # train: {dotted key: value} over config.base
  source: str = ""          # eval: the training run whose checkpoint is evaluated
  model_overrides: Any = None  # eval: {ModelConfig key: value} (zero-shot changes)


def train_name(model: str) -> str:
  return f"train:{model}"


def eval_name(model: str) -> str:
  return f"eval:{model}"


def merged(*overrides) -> dict:
  """Nested override dicts combined left to right: sections (dicts) merge, values replace."""
  out: dict = {}
  for over in overrides:
    for key, value in dict(over).items():
      value = value.to_dict() if hasattr(value, "to_dict") else value  # a ConfigDict section
      if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
        out[key] = merged(out[key], value)
      else:
        out[key] = copy.deepcopy(value)
  return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` (nested like it) merged in: an existing section
  merges, anything else (a value, a new key, a section over None) is set."""
  config = copy.deepcopy(config)

  def merge(node, over):
    for key, value in over.items():
      if isinstance(value, Mapping) and isinstance(node.get(key), ml_collections.ConfigDict):
        merge(node[key], value)
      else:
        with node.ignore_type():
          node[key] = copy.deepcopy(value)
  merge(config, over=dict(overrides))
  return config


def _mixture_overrides(study, mixture: str) -> dict:
  return merged(study.extend_overrides, {"data": {"mixture": study.mixtures[mixture]}})


def build(study: ml_collections.ConfigDict) -> list[Item]:
  """Every item of the study, in an order that respects `after`."""
  base, items = merged(study.base_overrides), []
  pretrain_cost = 3.0
  for scheme, over in study.schemes.items():
    items.append(Item(train_name(f"pretrain_{scheme}"), "train", f"pretrain_{scheme}",
                      "pretrain", cost=pretrain_cost, overrides=merged(base, over)))
  steps = int(base["train"]["steps"])
  lengths = list(study.get("growlength_lengths") or [])
  per_stage = [steps // max(1, len(lengths))] * len(lengths)
  if lengths:
    per_stage[-1] += steps - sum(per_stage)
  if lengths:
    items.append(Item(train_name("growlength"), "train", "growlength", "growlength",
                      cost=pretrain_cost, overrides=merged(base, {"stages": [
                          dict(seq_len=n, steps=s) for n, s in zip(lengths, per_stage)]})))
  # The model every extension starts from: the pretrained RoPE run, or (at scale) a Hugging
  # Face checkpoint given as `base_hf` (no pretraining items then).
  base_hf = study.get("base_hf") or ""
  rope = () if base_hf else (train_name("pretrain_rope"),)
  init = ({"train": {"init_from_hf": base_hf}} if base_hf
          else {"train": {"init_from": "<runs>/pretrain_rope"}})
  ext_mix = _mixture_overrides(study, study.extension_mixture)
  for method, over in study.extensions.items():
    items.append(Item(train_name(f"extend_{method}"), "train", f"extend_{method}", "extend",
                      after=rope, overrides=merged(base, ext_mix, init, over)))
  ablation = study.extensions[study.ablation_method]
  for mixture in study.mixtures:
    if mixture == study.extension_mixture:  # that run is extend_<ablation_method>
      continue
    items.append(Item(train_name(f"mixture_{mixture}"), "train", f"mixture_{mixture}",
                      "mixture", after=rope, overrides=merged(
                          base, _mixture_overrides(study, mixture), init, ablation)))
  for item in list(items):
    if item.model == "growlength":  # judged by its training curve and eval loss
      continue
    items.append(Item(eval_name(item.model), "eval", item.model, item.group,
                      after=(item.name,), cost=1.5, source=item.model))
  for name, over in study.zero_shot.items():
    items.append(Item(eval_name(f"zeroshot_{name}"), "eval", f"zeroshot_{name}", "zeroshot",
                      after=rope, cost=1.5, source=f"hf:{base_hf}" if base_hf
                      else "pretrain_rope", model_overrides=merged(over)))
  return items


def mixture_run(study, mixture: str) -> str:
  """The training run of the data ablation for `mixture`."""
  if mixture == study.extension_mixture:
    return f"extend_{study.ablation_method}"
  return f"mixture_{mixture}"


def by_name(items: list[Item]) -> dict[str, Item]:
  return {i.name: i for i in items}
