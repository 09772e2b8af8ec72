#!/usr/bin/env bash
# Local (CPU) entry point: makes .venv on first use, installs ctxjax and the extras the task
# needs, then runs it. Usage:
#   bash launch/local.sh study [--workdir=runs/study] [--preset=quick|full]
#   bash launch/local.sh train [--config=configs/tiny.py] [--workdir=runs/tiny] [--config.x=y ...]
#   bash launch/local.sh test  [pytest args ...]
# CTXJAX_VENV overrides the virtualenv location; CTXJAX_MALLOC_DEFAULTS=1 keeps glibc's malloc
# defaults for train / study (see ctxjax/host_memory.py).
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:-study}
shift || true
venv=${CTXJAX_VENV:-.venv}
case "$task" in
  train|study) extras="" ;;
  test) extras="[test,hf,tpu-aot]" ;;  # tpu-aot: the TPU topology compiles of tests/test_aot.py
  *) echo "launch/local.sh: unknown task '$task'; valid choices: study, train, test" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
# Reinstall only when the package metadata or the requested extras change.
stamp="$venv/.ctxjax-install-$(cat pyproject.toml | sha1sum | cut -c1-12)-${extras//[^a-z,]/}"
if [ ! -f "$stamp" ]; then
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -e ".$extras"
  touch "$stamp"
fi
if [ "$task" != test ]; then
  # Transparent huge pages for glibc's large blocks: XLA:CPU's per-step temporary buffer is
  # otherwise faulted in anew, 4 KiB at a time, every step (ctxjax/host_memory.py).
  tunables=$("$py" -m ctxjax.host_memory)
  [ -z "$tunables" ] || export GLIBC_TUNABLES="$tunables"
fi
case "$task" in
  train)
    args=("$@")
    [[ " ${args[*]-} " == *" --config="* ]] || args=(--config=configs/tiny.py "${args[@]}")
    [[ " ${args[*]-} " == *" --workdir="* ]] || args=(--workdir=runs/tiny "${args[@]}")
    exec "$py" -m ctxjax.train "${args[@]}" ;;
  study)
    args=("$@")
    [[ " ${args[*]-} " == *" --workdir="* ]] || args=(--workdir=runs/study "${args[@]}")
    exec "$py" -m ctxjax.study "${args[@]}" ;;
  test)
    # One pytest worker per core, a test file per worker (module fixtures compile once); most
    # of the suite is single-threaded XLA compilation, so this is ~2x on a 2-core machine.
    exec "$py" -m pytest -q -n "${CTXJAX_TEST_WORKERS:-auto}" --dist loadfile "$@" ;;
esac
