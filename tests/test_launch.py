"""Launchers: --dry-run output (the exact commands, safely quoted), and the generated commands
RUN under bash with stand-ins for gcloud / srun / the trainer that record their argv and trap
SIGTERM, so a `stop` that signals the wrong process fails here (no gcloud / SLURM needed)."""
import importlib.util
import os
import shlex
import signal
import stat
import subprocess
import time

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
  assert ("state=$(gcloud compute tpus queued-resources describe ctx-1 --zone=us-east5-a "
          "--project=my-proj '--format=value(state.state)')") in wait[2]
  assert "deadline=$((SECONDS + 10800))" in wait[2]  # --timeout default: 3 hours


def test_install_copies_the_checkout_to_every_worker(capsys):
  pack, scp, ssh = _dry(capsys, "install", *BASE, "--tmpdir=/tmp/x y")
  assert pack == ["bash", "-c", f"cd {shlex.quote(ROOT)} && git ls-files -z | "
                                "tar --null -T - -czf '/tmp/x y/ctxjax-src.tar.gz'"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/x y/ctxjax-src.tar.gz",
                 "ctx-1:ctxjax-src.tar.gz", *WHERE, "--worker=all"]
  assert ssh == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ctx-1", *WHERE, "--worker=all",
                 "--command=mkdir -p ctxjax && tar -xzf ctxjax-src.tar.gz -C ctxjax && "
                 "cd ctxjax && python3 -m pip install -q --user uv && "
                 "~/.local/bin/uv venv -q --seed --python 3.11 \"$HOME/ctxjax-venv\" && "
                 "\"$HOME/ctxjax-venv/bin/python\" -m pip install -q -e '.[tpu]' "
                 + shlex.join(tpu_vm.PINS)]


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
  head, rest = remote.split(" && { nohup ", 1)
  trainer, tail = rest.split(" > ", 1)
  assert head == "cd ctxjax"
  assert shlex.split(trainer) == ["$HOME/ctxjax-venv/bin/python", "-m", "ctxjax.train",
                                  "--config=configs/llama2_7b_80k.py",
                                  "--workdir=gs://bucket/7b 80k", "--config.train.steps=10",
                                  TRICKY]
  assert tail == "~/ctxjax-train.log 2>&1 < /dev/null & echo $! > ~/ctxjax-train.pid; }"


def test_up_is_create_install_run(capsys):
  steps = _dry(capsys, "up", *BASE, "--accelerator-type=v6e-16", "--config=configs/tiny.py",
               "--workdir=gs://b/r")
  assert [c[4] if c[0] == "gcloud" else c[0] for c in steps] == [
      "create", "bash", "scp", "ssh", "ssh"]
  assert "--version=v2-alpha-tpuv6e" in steps[0]


def test_logs_stop_delete(capsys):
  assert _dry(capsys, "logs", *BASE, "--worker=3")[0][-2:] == [
      "--worker=3", "--command=tail -n 100 -F ~/ctxjax-train.log"]
  assert _dry(capsys, "stop", *BASE)[0][-2] == "--worker=all"
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
# tpu_vm.py's commands, run: a fake `gcloud` runs `ssh --command=...` under bash in a temporary
# HOME (one worker), and the trainer is a script that records its argv and traps SIGTERM.
# ---------------------------------------------------------------------------------------------

LIVE = ["--tpu=ctx-1", "--zone=us-east5-a"]

FAKE_GCLOUD = r"""#!/bin/bash
printf '%s\n' "$*" >> "$FAKE_DIR/gcloud.calls"
for a in "$@"; do
  case "$a" in --command=*) cd "$HOME" && exec bash -c "${a#--command=}" ;; esac
done
if [ "$4" = scp ] && [ "$5" != --recurse ]; then cp "$5" "$HOME/${6#*:}"; fi
if [ "$4" = describe ]; then  # queued-resources describe: the next scripted state
  n=$(cat "$FAKE_DIR/polls" 2> /dev/null || echo 0)
  echo $((n + 1)) > "$FAKE_DIR/polls"
  sed -n "$((n + 1))p" "$FAKE_DIR/states"
fi
"""

# `$$` is this process: after every `exec` on the way, the pid a launcher must signal.
FAKE_TRAINER = r"""#!/bin/bash
printf '%s\n' "$$" "$PWD" "$@" > "$FAKE_DIR/trainer.argv"
trap 'echo "got TERM" > "$FAKE_DIR/trainer.signal"; exit 0' TERM
while :; do sleep 0.05; done
"""


def _script(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


@pytest.fixture
def fake_pod(tmp_path, monkeypatch):
  """PATH with the fake gcloud (and a no-op sleep), HOME a fresh worker with the trainer
  installed as the venv's python; yields the dir where the fakes record what they saw."""
  fake, home, bin_dir = tmp_path / "fake", tmp_path / "home", tmp_path / "bin"
  fake.mkdir()
  (home / "ctxjax").mkdir(parents=True)
  _script(bin_dir / "gcloud", FAKE_GCLOUD)
  _script(bin_dir / "sleep", "#!/bin/bash\n")   # the queued-resource poll, without waiting
  _script(home / "ctxjax-venv" / "bin" / "python", FAKE_TRAINER)
  monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("FAKE_DIR", str(fake))
  yield fake


def _wait_for(path, seconds=20):
  deadline = time.time() + seconds
  while not path.exists() or not path.read_text().strip():
    assert time.time() < deadline, f"{path.name} never appeared"
    time.sleep(0.05)
  return path.read_text().splitlines()


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_stop_delivers_sigterm_to_the_trainer_itself(fake_pod):
  home = os.environ["HOME"]
  assert tpu_vm.main(["run", *LIVE, "--config=configs/tiny.py", "--workdir=gs://b/r", "--",
                      TRICKY]) == 0
  pid, cwd, *argv = _wait_for(fake_pod / "trainer.argv")
  try:
    assert cwd == os.path.join(home, "ctxjax")
    assert argv == ["-m", "ctxjax.train", "--config=configs/tiny.py", "--workdir=gs://b/r", TRICKY]
    with open(os.path.join(home, "ctxjax-train.pid")) as f:
      assert f.read().strip() == pid  # the pid file names the trainer, not a shell around it
    assert tpu_vm.main(["stop", *LIVE]) == 0
    # stop returns once the trainer has exited (it had time to checkpoint)
    assert (fake_pod / "trainer.signal").exists(), "stop did not SIGTERM the trainer"
    assert (fake_pod / "trainer.signal").read_text() == "got TERM\n"
    assert not _alive(int(pid))
    assert not os.path.exists(os.path.join(home, "ctxjax-train.pid"))
  finally:
    if _alive(int(pid)):
      os.kill(int(pid), signal.SIGKILL)
  assert tpu_vm.main(["stop", *LIVE]) == 0  # nothing running: a no-op


def test_stop_reports_a_trainer_that_does_not_exit(fake_pod):
  home = os.environ["HOME"]
  _script(fake_pod.parent / "home" / "ctxjax-venv" / "bin" / "python",
          FAKE_TRAINER.replace("exit 0'", "'"))  # records TERM, keeps running
  assert tpu_vm.main(["run", *LIVE, "--config=c.py", "--workdir=gs://b/r"]) == 0
  pid = int(_wait_for(fake_pod / "trainer.argv")[0])
  try:
    assert tpu_vm.main(["stop", *LIVE, "--stop-timeout=1"]) == 1
    assert (fake_pod / "trainer.signal").read_text() == "got TERM\n"
    assert os.path.exists(os.path.join(home, "ctxjax-train.pid"))  # kept: stop again later
  finally:
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("states, rc, message", [
    (["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], 0, None),
    (["WAITING_FOR_RESOURCES", "FAILED"], 1, "queued resource ctx-1 is FAILED"),
    (["SUSPENDED"], 1, "queued resource ctx-1 is SUSPENDED"),
    (["WAITING_FOR_RESOURCES"] * 1000, 1,
     "not ACTIVE after 0s (last state: WAITING_FOR_RESOURCES)"),
])
def test_queued_wait_stops_on_active_failed_suspended_or_timeout(fake_pod, capfd, states, rc,
                                                                 message):
  (fake_pod / "states").write_text("\n".join(states) + "\n")
  timeout = ["--timeout=0"] if len(states) == 1000 else []
  assert tpu_vm.main(["create", *LIVE, "--accelerator-type=v5p-8", "--queued",
                      *timeout]) == rc
  err = capfd.readouterr().err
  if message:
    assert message in err
  polls = int((fake_pod / "polls").read_text())
  assert polls == (1 if timeout else len(states))


def test_install_makes_a_venv_with_the_tested_versions(fake_pod, tmp_path):
  home = tmp_path / "home"
  (home / "ctxjax-venv").rename(tmp_path / "unused")  # the install makes the venv
  _script(tmp_path / "bin" / "python3",
          '#!/bin/bash\nprintf \'%s\\n\' "$*" >> "$FAKE_DIR/python3.calls"\n'
          'mkdir -p "$HOME/.local/bin"\n'
          f'cp {shlex.quote(str(tmp_path / "bin" / "uv.src"))} "$HOME/.local/bin/uv"\n')
  venv_python = ('#!/bin/bash\nprintf \'%s\\n\' "$PWD $*" >> "$FAKE_DIR/venv.calls"\n')
  _script(tmp_path / "bin" / "uv.src",
          '#!/bin/bash\nprintf \'%s\\n\' "$*" >> "$FAKE_DIR/uv.calls"\n'
          'mkdir -p "$HOME/ctxjax-venv/bin"\n'
          f"printf '%s' {shlex.quote(venv_python)} > \"$HOME/ctxjax-venv/bin/python\"\n"
          'chmod +x "$HOME/ctxjax-venv/bin/python"\n')
  assert tpu_vm.main(["install", *LIVE, f"--tmpdir={tmp_path}"]) == 0
  assert (home / "ctxjax" / "pyproject.toml").exists()  # the checkout arrived
  assert (fake_pod / "python3.calls").read_text() == "-m pip install -q --user uv\n"
  assert (fake_pod / "uv.calls").read_text() == f"venv -q --seed --python 3.11 {home}/ctxjax-venv\n"
  assert (fake_pod / "venv.calls").read_text() == (
      f"{home}/ctxjax -m pip install -q -e .[tpu] {' '.join(tpu_vm.PINS)}\n")


def test_pins_are_the_tested_versions():
  """PINS (what a pod installs) and pyproject's tested-versions note say the same thing."""
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    text = f.read()
  for pin in tpu_vm.PINS:
    assert pin.replace("[tpu]", "") in text, pin


# ---------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------

def _slurm(tmp_path, args, path=None, **env):
  """Run launch/slurm.sh with a controlled PATH (default: no scontrol), SLURM variables and a
  virtualenv in tmp_path whose python is the fake trainer."""
  empty = tmp_path / "empty"
  empty.mkdir(exist_ok=True)
  venv = tmp_path / "venv"
  _script(venv / "bin" / "python", FAKE_TRAINER)
  full = {"PATH": path or str(empty), "HOME": str(tmp_path), "CTXJAX_VENV": str(venv), **env}
  return subprocess.run(["/bin/bash", SLURM, *args], env=full, capture_output=True, text=True,
                        timeout=60, cwd=tmp_path)


ARGS = ["--config=configs/llama2_7b_8xh100.py", "--workdir=/mnt/runs/7b 80k", TRICKY]
TASK = ('cd "$1" && python=$2 && shift 2 && exec "$python" -m ctxjax.train '
        '--process_id="$SLURM_PROCID" "$@"')


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[003-004,009]", "gpu003"), ("node7", "node7"), ("a1,b2", "a1"),
    ("h100-[12-13]", "h100-12")])
def test_slurm_dry_run(tmp_path, nodelist, first):
  proc = _slurm(tmp_path, ["--dry-run", *ARGS], SLURM_JOB_NODELIST=nodelist, SLURM_NNODES="3")
  assert proc.returncode == 0, proc.stderr
  [line] = proc.stdout.splitlines()
  assert shlex.split(line) == [
      "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c", TASK, "ctxjax", ROOT,
      str(tmp_path / "venv" / "bin" / "python"), f"--coordinator_address={first}:12355",
      "--num_processes=3", *ARGS]


def test_slurm_uses_scontrol_and_each_task_its_procid(tmp_path):
  bin_dir = tmp_path / "bin"
  _script(bin_dir / "scontrol", "#!/bin/bash\nprintf 'first-node\\nsecond-node\\n'\n")
  path = f"{bin_dir}:/usr/bin:/bin"
  proc = _slurm(tmp_path, ["--dry-run", *ARGS], path=path, SLURM_JOB_NODELIST="gpu[1-2]",
                SLURM_NNODES="2", CTXJAX_PORT="2222", CTXJAX_PYTHON="echo")
  assert proc.returncode == 0, proc.stderr
  argv = shlex.split(proc.stdout)
  assert argv[9:11] == ["--coordinator_address=first-node:2222", "--num_processes=2"]
  # What srun would start on node 1: the task's own shell expands its SLURM_PROCID.
  task = subprocess.run(argv[3:], env={"PATH": path, "SLURM_PROCID": "1"},
                        capture_output=True, text=True, timeout=60)
  assert task.stdout.split("\n")[0] == (
      "-m ctxjax.train --process_id=1 --coordinator_address=first-node:2222 --num_processes=2 "
      + " ".join(ARGS))


FAKE_SRUN = r"""#!/bin/bash
printf '%s\n' "$@" > "$FAKE_DIR/srun.argv"
while [[ $1 == --* ]]; do shift; done
SLURM_PROCID=0 exec "$@"
"""


def test_slurm_runs_the_venv_trainer_in_the_checkout_and_scancel_reaches_it(tmp_path):
  """Submitted from elsewhere, the task runs the venv's python in the checkout; SIGTERM to the
  job (scancel, --signal) reaches the trainer (a fake srun that execs its task, as one node)."""
  fake, bin_dir, elsewhere = tmp_path / "fake", tmp_path / "bin", tmp_path / "elsewhere"
  fake.mkdir()
  elsewhere.mkdir()
  _script(bin_dir / "srun", FAKE_SRUN)
  venv = tmp_path / "venv"
  _script(venv / "bin" / "python", FAKE_TRAINER)
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_DIR": str(fake),
         "CTXJAX_VENV": str(venv), "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1"}
  proc = subprocess.Popen(["/bin/bash", SLURM, *ARGS], env=env, cwd=elsewhere,
                          stderr=subprocess.PIPE, text=True)
  try:
    pid, cwd, *argv = _wait_for(fake / "trainer.argv")
    assert cwd == ROOT
    assert argv == ["-m", "ctxjax.train", "--process_id=0", "--coordinator_address=n1:12355",
                    "--num_processes=1", *ARGS]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert (fake / "trainer.signal").exists(), "SIGTERM to the job missed the trainer"
    assert int(pid) == proc.pid  # exec all the way down: the job's process IS the trainer
  finally:
    if proc.poll() is None:
      proc.kill()
    if (fake / "trainer.argv").exists():
      trainer = int((fake / "trainer.argv").read_text().split()[0])
      if _alive(trainer):
        os.kill(trainer, signal.SIGKILL)


@pytest.mark.parametrize("args, env, message", [
    (["--dry-run", "--config=configs/tiny.py"], {"SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1"},
     "needs --config"),
    (["--dry-run", *ARGS], {}, "not in a SLURM allocation"),
    (["--dry-run", *ARGS], {"SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1",
                            "CTXJAX_ROOT": "/nonexistent"}, "set CTXJAX_ROOT"),
    (["--dry-run", *ARGS], {"SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1",
                            "CTXJAX_VENV": "/nonexistent"}, "no virtualenv at '/nonexistent'"),
])
def test_slurm_errors(tmp_path, args, env, message):
  proc = _slurm(tmp_path, args, **env)
  assert proc.returncode != 0 and message in proc.stderr
