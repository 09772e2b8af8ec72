#!/usr/bin/env python3
"""Cloud TPU VM launcher: create a slice, install ctxjax on every worker, run, watch, tear down.

  python launch/tpu_vm.py up     --tpu=NAME --zone=Z --accelerator-type=v5p-128 \
      --config=configs/llama2_7b_80k.py --workdir=gs://BUCKET/run [-- --config.a.b=value ...]
  python launch/tpu_vm.py create|install|copy|run|logs|stop|delete  (the same flags)

Steps (`up` = create, install, run):
  create    gcloud compute tpus tpu-vm create (or, with --queued, queued-resources create and a
            wait until the slice is ACTIVE that stops on FAILED/SUSPENDED or after --timeout
            seconds; --spot for preemptible capacity);
  install   pack this checkout (git-tracked files), copy it to every worker (--worker=all) and
            install it there into a virtualenv (~/ctxjax-venv, Python 3.11 via uv: TPU VM images
            ship an older python3) with the package versions ctxjax is tested with (PINS);
  copy      copy configs/ again (edit a recipe without reinstalling);
  run       start `~/ctxjax-venv/bin/python -m ctxjax.train --config=... --workdir=...` on ALL
            workers at once (SPMD: every host runs the same program; jax.distributed finds the
            slice itself), in the background with its log in ~/ctxjax-train.log and the
            TRAINER's own pid in ~/ctxjax-train.pid;
  logs      follow worker 0's log (--worker=N for another);
  stop      SIGTERM the trainer on every worker and wait until it has exited: it saves a
            checkpoint first, so `stop` then `delete` loses nothing, and a later `run` with the
            same --workdir resumes;
  delete    delete the slice (or the queued resource).
`--dry-run` prints every command, shell-quoted exactly as it would run, and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "ctxjax"                    # on each worker, under the login user's home
ARCHIVE = "ctxjax-src.tar.gz"
LOG, PID = "~/ctxjax-train.log", "~/ctxjax-train.pid"
# The remote virtualenv and its interpreter ("$HOME", not "~": it is inside double quotes).
VENV = "$HOME/ctxjax-venv"
PYTHON = f'"{VENV}/bin/python"'
# What ctxjax is tested with (pyproject.toml records the same versions): a pod run installs
# exactly these, not whatever is newest on the day.
PYTHON_VERSION = "3.11"
PINS = ("jax[tpu]==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "optax==0.2.8",
        "orbax-checkpoint==0.12.8", "grain==0.2.18")
# Cloud TPU software versions per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
STEPS = ("create", "install", "copy", "run", "logs", "stop", "delete", "up")


def _where(args) -> list[str]:
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def _ssh(args, remote: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, *_where(args),
          f"--worker={worker}", f"--command={remote}"]


def runtime_version(args) -> str:
  if args.version:
    return args.version
  generation = args.accelerator_type.split("-")[0]
  if generation not in RUNTIMES:
    raise ValueError(f"--accelerator-type={args.accelerator_type!r}: unknown generation "
                     f"{generation!r}; valid: {sorted(RUNTIMES)} (or pass --version)")
  return RUNTIMES[generation]


def create(args) -> list[list[str]]:
  if not args.accelerator_type:
    raise ValueError("create needs --accelerator-type (e.g. v5p-128)")
  spot = ["--spot"] if args.spot else []
  if args.queued:
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    return [
        qr + ["create", args.tpu, f"--node-id={args.tpu}", *_where(args),
              f"--accelerator-type={args.accelerator_type}",
              f"--runtime-version={runtime_version(args)}", *spot],
        ["bash", "-c", wait_until_active(args)],
    ]
  return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.tpu, *_where(args),
           f"--accelerator-type={args.accelerator_type}", f"--version={runtime_version(args)}",
           *spot]]


def wait_until_active(args) -> str:
  """Shell loop: poll the queued resource until ACTIVE (exit 0); FAILED or SUSPENDED (never
  become ACTIVE by themselves) or --timeout seconds without ACTIVE exit 1 with the state."""
  describe = shlex.join(["gcloud", "compute", "tpus", "queued-resources", "describe", args.tpu,
                         *_where(args), "--format=value(state.state)"])
  return (f"name={shlex.quote(args.tpu)}; deadline=$((SECONDS + {int(args.timeout)})); "
          f"while :; do state=$({describe}); case \"$state\" in "
          "ACTIVE) exit 0 ;; "
          "FAILED|SUSPENDED) echo \"launch/tpu_vm.py: queued resource $name is $state (gcloud "
          "compute tpus queued-resources describe $name says why)\" >&2; exit 1 ;; esac; "
          "if [ $SECONDS -ge $deadline ]; then echo \"launch/tpu_vm.py: queued resource $name "
          f"not ACTIVE after {int(args.timeout)}s (last state: ${{state:-unknown}}); raise "
          "--timeout or delete it\" >&2; exit 1; fi; sleep 30; done")


def install(args) -> list[list[str]]:
  local = os.path.join(args.tmpdir, ARCHIVE)
  remote = (f"mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR} && "
            f"cd {REMOTE_DIR} && python3 -m pip install -q --user uv && "
            f'~/.local/bin/uv venv -q --seed --python {PYTHON_VERSION} "{VENV}" && '
            f"{PYTHON} -m pip install -q -e '.[tpu]' {shlex.join(PINS)}")
  return [
      # git-tracked files only: no venvs, runs or caches travel.
      ["bash", "-c", f"cd {shlex.quote(ROOT)} && git ls-files -z | "
                     f"tar --null -T - -czf {shlex.quote(local)}"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{args.tpu}:{ARCHIVE}",
       *_where(args), "--worker=all"],
      _ssh(args, remote),
  ]


def copy(args) -> list[list[str]]:
  return [["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
           os.path.join(ROOT, "configs"), f"{args.tpu}:{REMOTE_DIR}/", *_where(args),
           "--worker=all"]]


def train_command(args) -> str:
  """The trainer's command line as the remote shell will see it (each argument quoted)."""
  if not args.config or not args.workdir:
    raise ValueError("run needs --config and --workdir (use a gs:// bucket: every worker and "
                     "every restart must see the same checkpoints)")
  argv = ["-m", "ctxjax.train", f"--config={args.config}", f"--workdir={args.workdir}",
          *args.overrides]
  return f"{PYTHON} {shlex.join(argv)}"


def run(args) -> list[list[str]]:
  # `&` binds to the nohup command alone (not to `cd ... && nohup ...`, which would background
  # a subshell and make $! the subshell's pid): bash forks, nohup execs the interpreter, so
  # $! is the trainer's own pid and `stop` signals the trainer itself.
  remote = (f"cd {REMOTE_DIR} && {{ nohup {train_command(args)} > {LOG} 2>&1 < /dev/null & "
            f"echo $! > {PID}; }}")
  return [_ssh(args, remote)]


def logs(args) -> list[list[str]]:
  return [_ssh(args, f"tail -n 100 -F {LOG}", worker=str(args.worker))]


def stop(args) -> list[list[str]]:
  # SIGTERM: the trainer checkpoints and exits (ctxjax/train/checkpoint.py); wait for the exit
  # so that a `delete` right after cannot cut the checkpoint short.
  # A trainer still running after --stop-timeout seconds keeps its pid file (stop again).
  wait = int(args.stop_timeout)
  return [_ssh(args, f"if test -f {PID}; then pid=$(cat {PID}); "
                     "if kill -TERM \"$pid\" 2> /dev/null; then "
                     f"deadline=$((SECONDS + {wait})); "
                     "while kill -0 \"$pid\" 2> /dev/null; do if [ $SECONDS -ge $deadline ]; "
                     f"then echo \"launch/tpu_vm.py: trainer $pid still running {wait}s after "
                     f"SIGTERM (see {LOG}); run stop again\" >&2; exit 1; fi; sleep 1; done; "
                     f"fi; rm -f {PID}; fi")]


def delete(args) -> list[list[str]]:
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.tpu, *_where(args),
             "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.tpu, *_where(args), "--quiet"]]


PLANS = {"create": create, "install": install, "copy": copy, "run": run, "logs": logs,
         "stop": stop, "delete": delete,
         "up": lambda a: create(a) + install(a) + run(a)}


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("step", choices=STEPS)
  parser.add_argument("--tpu", required=True, help="TPU VM (or queued resource) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None)
  parser.add_argument("--accelerator-type", default=None, help="e.g. v5p-128, v5litepod-16")
  parser.add_argument("--version", default=None, help="TPU software version (default per type)")
  parser.add_argument("--queued", action="store_true", help="use queued-resources")
  parser.add_argument("--spot", action="store_true")
  parser.add_argument("--timeout", default=3 * 3600, type=float,
                      help="seconds --queued waits for ACTIVE before giving up (default 3h)")
  parser.add_argument("--stop-timeout", default=1800, type=float,
                      help="seconds stop waits for the trainer to save and exit (default 30min)")
  parser.add_argument("--config", default=None, help="configs/<recipe>.py[:arg]")
  parser.add_argument("--workdir", default=None, help="gs://bucket/path")
  parser.add_argument("--worker", default=0, type=int, help="worker whose log `logs` follows")
  parser.add_argument("--tmpdir", default="/tmp")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  # Everything after `--` goes to the trainer verbatim, e.g. -- --config.train.steps=10
  cut = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:cut])
  args.overrides = list(argv[cut + 1:])
  return args


def main(argv=None) -> int:
  args = parse(list(sys.argv[1:] if argv is None else argv))
  try:
    commands = PLANS[args.step](args)
  except ValueError as err:
    print(f"launch/tpu_vm.py: {err}", file=sys.stderr)
    return 2
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      rc = subprocess.run(cmd).returncode
      if rc:  # the command printed why; stop before the next step builds on a failed one
        print(f"launch/tpu_vm.py: {args.step}: `{cmd[0]} ...` exited {rc}", file=sys.stderr)
        return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
