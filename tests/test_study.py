"""The study end to end at `smoke` size (configs/study.py: one item of each kind, a few steps):
the plan, the workers, resume after a kill, the report's tables, plots and findings."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ctxjax.study import __main__ as study_main
from ctxjax.study import findings, item, plan, report, scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "study.py")


def _study(preset="smoke"):
  return study_main.load_study_config(CONFIG, preset)


def test_plan_covers_the_issue_and_orders_dependencies():
  items = plan.build(_study("quick"))
  names = [it.name for it in items]
  for model in ("pretrain_rope", "pretrain_alibi", "pretrain_xpos", "pretrain_learned",
                "growlength", "extend_pi", "extend_yarn", "extend_abf", "extend_longlora",
                "mixture_cut_short", "mixture_cut_long", "mixture_global_upsample",
                "mixture_upsample_sources"):
    assert plan.train_name(model) in names
  for model in ("zeroshot_dynamic_ntk", "zeroshot_yarn", "zeroshot_lm_infinite",
                "extend_abf", "pretrain_learned"):
    assert plan.eval_name(model) in names
  assert len(names) == len(set(names))
  seen = set()
  for it in items:  # build() lists an item after everything it needs
    assert set(it.after) <= seen, it.name
    seen.add(it.name)
  study = _study("quick")
  cfg = item.train_config(study, plan.by_name(items)["train:extend_yarn"], "/w")
  assert cfg.model.rope_scaling.rope_type == "yarn" and cfg.model.hidden_size == 64
  assert cfg.train.init_from == "/w/runs/pretrain_rope"
  assert cfg.data.mixture.kind == "per_source_upsample" and cfg.data.seq_len == 512
  assert cfg.optim.learning_rate == 1e-3 and cfg.optim.warmup_steps == 5
  # the ablation's per-source run is the ABF extension: same steps and tokens as the others
  assert plan.mixture_run(study, "per_source_upsample") == "extend_abf"


def test_smoke_plan_keeps_one_item_of_each_kind():
  study = _study("smoke")
  items = plan.build(study)
  assert {(it.kind, it.group) for it in items} == {
      ("train", g) for g in ("pretrain", "growlength", "extend", "mixture")} | {
      ("eval", g) for g in ("pretrain", "extend", "zeroshot", "mixture")}
  assert len(study.growlength_lengths) > 1 and study.zero_shot
  lora = item.train_config(study, plan.by_name(items)["train:extend_longlora"], "/w")
  assert lora.model.lora_rank > 0 and lora.model.attention_mode == "s2"
  # the per-source run of the ablation is an extension item, the other mixtures train too
  assert plan.mixture_run(study, "per_source_upsample") in {it.model for it in items}
  assert plan.mixture_run(study, "cut_short") in {it.model for it in items}


def test_merged_sections_merge_values_replace():
  out = plan.merged({"model": {"a": 1, "s": {"x": 1}}}, {"model": {"b": 2, "s": None}})
  assert out == {"model": {"a": 1, "b": 2, "s": None}}


def test_findings_rules_on_hand_made_numbers():
  ppl = {"pretrain_alibi": {128: 10.0, 2048: 11.0}, "pretrain_rope": {128: 10.0, 2048: 40.0},
         "pretrain_learned": {128: 10.0, 2048: 90.0}, "pretrain_xpos": {128: 10.0, 2048: 30.0}}
  r = findings.Results(ppl, {}, {}, 128, 512, {}, {})
  assert findings.alibi_extrapolates(r).verdict == findings.REPRODUCED
  ppl["pretrain_rope"][2048] = 13.0  # rises 30%, ALiBi 10%: not a blow-up, not flat either
  f = findings.alibi_extrapolates(r)
  assert f.verdict == findings.NOT_REPRODUCED and f.reason
  ppl["pretrain_alibi"][2048] = 10.2  # ALiBi flat, RoPE and learned rise: the direction only
  assert findings.alibi_extrapolates(r).verdict == findings.DIRECTION_ONLY
  assert findings.longlora_close(r).verdict == findings.NOT_MEASURED
  r.ppl.update(extend_pi={512: 10.0}, extend_longlora={512: 10.5})
  assert findings.longlora_close(r).verdict == findings.REPRODUCED
  r.ppl["extend_longlora"][512] = 12.0
  assert findings.longlora_close(r).verdict == findings.NOT_REPRODUCED


def test_growlength_seconds_to_target():
  rows = [{"step": s, "loss": loss, "batch_size": 4, "seq_len": 128, "tokens_per_sec": 512.0}
          for s, loss in ((1, 6.0), (2, 5.0), (3, 4.0), (4, 3.0))]
  curve = report.training_curve(rows)
  assert [round(t, 3) for t, _, _ in curve] == [1.0, 2.0, 3.0, 4.0]
  assert report.seconds_to(curve, 4.0, 128, window=3) == 4.0  # mean(5, 4, 3) = 4
  assert report.seconds_to(curve, 1.0, 128) is None


def _finished(workdir):
  items = plan.build(item.read_study(workdir))
  return {it.name for it in items if item.is_done(workdir, it)}, items


def test_smoke_study_resumes_after_a_kill_and_writes_the_report(tmp_path):
  workdir = str(tmp_path / "study")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "ctxjax.study", f"--workdir={workdir}", "--preset=smoke",
         "--parallel=1"]
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, start_new_session=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isfile(os.path.join(workdir, "study.json")) and _finished(workdir)[0]:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
  os.killpg(proc.pid, signal.SIGKILL)  # the scheduler and its worker, mid-study
  proc.wait()
  first, items = _finished(workdir)
  assert first and len(first) < len(items)
  stamps = {n: os.path.getmtime(os.path.join(item.out_dir(workdir, plan.by_name(items)[n]),
                                             item.DONE)) for n in first}

  # Resume in this process (parallel=0: the compiled programs are shared between items).
  study = item.read_study(workdir)
  skipped = []
  scheduler.run_items(workdir, items, parallel=0,
                      on_finish=lambda it, _, was_done: was_done and skipped.append(it.name))
  assert set(skipped) == first  # finished items are not run again
  for n, t in stamps.items():
    assert os.path.getmtime(os.path.join(item.out_dir(workdir, plan.by_name(items)[n]),
                                         item.DONE)) == t
  done, _ = _finished(workdir)
  assert done == {it.name for it in items}

  path = report.write_report(workdir, study, items)
  text = open(path).read()
  for section in ("## Findings", "## Perplexity vs length", "## Retrieval",
                  "## Data ablation", "## GrowLength", "## Runs"):
    assert section in text
  out = os.path.dirname(path)
  for png in ("ppl_schemes.png", "ppl_extensions.png", "ppl_mixtures.png", "passkey.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000, png
  results = json.load(open(os.path.join(out, "results.json")))
  verdicts = [f["verdict"] for f in results["findings"]]
  assert len(verdicts) == 5 and set(verdicts) <= {
      findings.REPRODUCED, findings.DIRECTION_ONLY, findings.NOT_REPRODUCED,
      findings.NOT_MEASURED}
  assert results["ppl"]["zeroshot_yarn"] and results["ppl"]["extend_longlora"]
  # a resumed study with another preset is refused in one line
  bad = subprocess.run([sys.executable, "-m", "ctxjax.study", f"--workdir={workdir}",
                        "--preset=quick"], env=env, cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and "another config" in bad.stderr.strip().splitlines()[-1]


def test_aot_check_of_a_study_compiles_each_distinct_item(tmp_path):
  """`python -m ctxjax.study --aot` (the at-scale recipe's fit check) in its own process: the
  study's and ctxjax.aot's flags coexist, items of one program compile once."""
  config = tmp_path / "cfg" / "aot_study.py"
  config.parent.mkdir()
  config.write_text(
      "from configs import study\n\n\n"
      "def get_config(arg):\n"
      "  c = study.get_config('smoke')\n"
      "  c.growlength_lengths = []\n"
      "  c.zero_shot = {}\n"
      "  c.aot = dict(devices='cpu:1')\n"
      "  return c\n")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "ctxjax.study", f"--config={config}", "--aot",
                         f"--workdir={tmp_path / 'w'}"], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  # pretrain_rope and extend_longlora; on CPU devices the verdict is "shapes ... compile"
  assert proc.stdout.count("  verdict   shapes and shardings compile") == 2, proc.stdout
  assert "mixture_cut_short: the same program as extend_longlora" in proc.stdout
