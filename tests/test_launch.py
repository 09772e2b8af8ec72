"""Launchers' --dry-run output: the exact commands, safely quoted (no gcloud / SLURM needed)."""
import importlib.util
import os
import shlex
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "launch", "slurm.sh")
_spec = importlib.util.spec_from_file_location("tpu_vm",
                                              os.path.join(ROOT, "launch", "tpu_vm.py"))
tpu_vm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu_vm)

BASE = ["--tpu=ctx-1", "--zone=us-east5-a", "--project=my-proj", "--dry-run"]
WHERE = ["--zone=us-east5-a", "--project=my-proj"]
TRICKY = "--config.data.jsonl=gs://b/it's a file.jsonl"  # a space and a quote


def _dry(capsys, *argv):
  assert tpu_vm.main(list(argv)) == 0
  return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_create(capsys):
  assert _dry(capsys, "create", *BASE, "--accelerator-type=v5p-128") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "ctx-1", *WHERE,
       "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"]]


def test_create_queued_spot_waits_until_active(capsys):
  create, wait = _dry(capsys, "create", *BASE, "--accelerator-type=v5litepod-16", "--queued",
                      "--spot")
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "ctx-1",
                    "--node-id=ctx-1", *WHERE, "--accelerator-type=v5litepod-16",
                    "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
  assert wait[:2] == ["bash", "-c"]
  assert wait[2] == ("until [ \"$(gcloud compute tpus queued-resources describe ctx-1 "
                     "--zone=us-east5-a --project=my-proj '--format=value(state.state)')\" = "
                     "ACTIVE ]; do sleep 30; done")


def test_install_copies_the_checkout_to_every_worker(capsys):
  pack, scp, ssh = _dry(capsys, "install", *BASE, "--tmpdir=/tmp/x y")
  assert pack == ["bash", "-c", f"cd {shlex.quote(ROOT)} && git ls-files -z | "
                                "tar --null -T - -czf '/tmp/x y/ctxjax-src.tar.gz'"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/x y/ctxjax-src.tar.gz",
                 "ctx-1:ctxjax-src.tar.gz", *WHERE, "--worker=all"]
  assert ssh == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ctx-1", *WHERE, "--worker=all",
                 "--command=mkdir -p ctxjax && tar -xzf ctxjax-src.tar.gz -C ctxjax && "
                 "cd ctxjax && python3 -m pip install -q -e '.[tpu]'"]


def test_copy_configs(capsys):
  assert _dry(capsys, "copy", *BASE) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", os.path.join(ROOT, "configs"),
       "ctx-1:ctxjax/", *WHERE, "--worker=all"]]


def test_run_on_all_workers_with_quoted_overrides(capsys):
  [ssh] = _dry(capsys, "run", *BASE, "--config=configs/llama2_7b_80k.py",
               "--workdir=gs://bucket/7b 80k", "--", "--config.train.steps=10", TRICKY)
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ctx-1", *WHERE]
  assert ssh[8] == "--worker=all"
  remote = ssh[9].removeprefix("--command=")
  # What the worker's shell runs: cd, then the trainer with every argument intact.
  head, rest = remote.split(" && nohup ", 1)
  trainer, tail = rest.split(" > ", 1)
  assert head == "cd ctxjax"
  assert shlex.split(trainer) == ["python3", "-m", "ctxjax.train",
                                  "--config=configs/llama2_7b_80k.py",
                                  "--workdir=gs://bucket/7b 80k", "--config.train.steps=10",
                                  TRICKY]
  assert tail == "~/ctxjax-train.log 2>&1 < /dev/null & echo $! > ~/ctxjax-train.pid"


def test_up_is_create_install_run(capsys):
  steps = _dry(capsys, "up", *BASE, "--accelerator-type=v6e-16", "--config=configs/tiny.py",
               "--workdir=gs://b/r")
  assert [c[4] if c[0] == "gcloud" else c[0] for c in steps] == [
      "create", "bash", "scp", "ssh", "ssh"]
  assert "--version=v2-alpha-tpuv6e" in steps[0]


def test_logs_stop_delete(capsys):
  assert _dry(capsys, "logs", *BASE, "--worker=3")[0][-2:] == [
      "--worker=3", "--command=tail -n 100 -F ~/ctxjax-train.log"]
  assert _dry(capsys, "stop", *BASE)[0][-2:] == [
      "--worker=all", "--command=test -f ~/ctxjax-train.pid && kill -TERM "
      "$(cat ~/ctxjax-train.pid) && rm -f ~/ctxjax-train.pid || true"]
  assert _dry(capsys, "delete", *BASE) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ctx-1", *WHERE, "--quiet"]]
  assert _dry(capsys, "delete", *BASE, "--queued") == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "ctx-1", *WHERE, "--force",
       "--quiet"]]


@pytest.mark.parametrize("argv, message", [
    (["create", *BASE, "--accelerator-type=v9-8"], "unknown generation 'v9'"),
    (["create", *BASE], "needs --accelerator-type"),
    (["run", *BASE, "--config=configs/tiny.py"], "needs --config and --workdir"),
])
def test_bad_flags(capsys, argv, message):
  assert tpu_vm.main(argv) == 2
  assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------

def _slurm(tmp_path, args, path=None, **env):
  """Run launch/slurm.sh with a controlled PATH (default: no scontrol) and SLURM variables."""
  empty = tmp_path / "empty"
  empty.mkdir(exist_ok=True)
  full = {"PATH": path or str(empty), "HOME": str(tmp_path), **env}
  return subprocess.run(["/bin/bash", SLURM, *args], env=full, capture_output=True, text=True,
                        timeout=60)


ARGS = ["--config=configs/llama2_7b_8xh100.py", "--workdir=/shared/runs/7b 80k", TRICKY]


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[003-004,009]", "gpu003"), ("node7", "node7"), ("a1,b2", "a1"),
    ("h100-[12-13]", "h100-12")])
def test_slurm_dry_run(tmp_path, nodelist, first):
  proc = _slurm(tmp_path, ["--dry-run", *ARGS], SLURM_JOB_NODELIST=nodelist, SLURM_NNODES="3")
  assert proc.returncode == 0, proc.stderr
  [line] = proc.stdout.splitlines()
  assert shlex.split(line) == [
      "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c",
      'exec python3 -m ctxjax.train --process_id="$SLURM_PROCID" "$@"', "ctxjax",
      f"--coordinator_address={first}:12355", "--num_processes=3", *ARGS]


def test_slurm_uses_scontrol_and_each_task_its_procid(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "scontrol"  # `scontrol show hostnames LIST`
  fake.write_text("#!/bin/bash\nprintf 'first-node\\nsecond-node\\n'\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  path = f"{bin_dir}:/usr/bin:/bin"
  proc = _slurm(tmp_path, ["--dry-run", *ARGS], path=path, SLURM_JOB_NODELIST="gpu[1-2]",
                SLURM_NNODES="2", CTXJAX_PORT="2222", CTXJAX_PYTHON="echo")
  assert proc.returncode == 0, proc.stderr
  argv = shlex.split(proc.stdout)
  assert argv[7:9] == ["--coordinator_address=first-node:2222", "--num_processes=2"]
  # What srun would start on node 1: the task's own shell expands its SLURM_PROCID.
  task = subprocess.run(argv[3:], env={"PATH": path, "SLURM_PROCID": "1"},
                        capture_output=True, text=True, timeout=60)
  assert task.stdout.split("\n")[0] == (
      "-m ctxjax.train --process_id=1 --coordinator_address=first-node:2222 --num_processes=2 "
      + " ".join(ARGS))


@pytest.mark.parametrize("args, env, message", [
    (["--dry-run", "--config=configs/tiny.py"], {"SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1"},
     "needs --config"),
    (["--dry-run", *ARGS], {}, "not in a SLURM allocation"),
])
def test_slurm_errors(tmp_path, args, env, message):
  proc = _slurm(tmp_path, args, **env)
  assert proc.returncode != 0 and message in proc.stderr
