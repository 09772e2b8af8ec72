#!/usr/bin/env bash
# SLURM launcher for GPU clusters: one ctxjax process per node (each drives all of its GPUs),
# joined by jax.distributed with the allocation's first node as coordinator.
#
#   sbatch --nodes=2 launch/slurm.sh --config=configs/llama2_7b_8xh100.py --workdir=/mnt/runs/x \
#       [--config.train.steps=10 ...]
#   bash launch/slurm.sh --dry-run --config=... --workdir=...   # print the commands, run nothing
#
# Inside the allocation the script derives, from SLURM's environment:
#   coordinator   first host of $SLURM_JOB_NODELIST, port $CTXJAX_PORT (default 12355)
#   num_processes $SLURM_NNODES (one task per node)
#   process_id    $SLURM_PROCID, read by each task itself (srun starts one per node)
# and passes them to the trainer as --coordinator_address --num_processes --process_id
# (ctxjax/train/distributed.py).
#
# Paths do not depend on the submit directory: each task runs in the ctxjax checkout, so
# --config=configs/... and a relative --workdir resolve there. The checkout is $CTXJAX_ROOT, else
# the directory above this script; sbatch runs a spooled copy of the script, so export it there
# (`CTXJAX_ROOT=/path/to/ctxjax sbatch ... launch/slurm.sh ...`; sbatch passes the environment
# on by default). The interpreter is the virtualenv's: $CTXJAX_VENV (default
# $CTXJAX_ROOT/.venv, what launch/local.sh makes), activated for the trainer and its children;
# CTXJAX_PYTHON overrides the interpreter itself.
# Signals: each task's shell `exec`s the trainer, and this script `exec`s srun, so scancel's
# SIGTERM (and --signal's, 5 minutes before the time limit) reaches the trainer itself, which
# saves a checkpoint and exits; resubmitting with the same --workdir resumes.
#
#SBATCH --job-name=ctxjax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --output=ctxjax-%j.log
#SBATCH --signal=TERM@300
set -euo pipefail

dry_run=0
args=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then dry_run=1; else args+=("$a"); fi
done
if [[ " ${args[*]-} " != *" --config="* || " ${args[*]-} " != *" --workdir="* ]]; then
  echo "launch/slurm.sh: needs --config=configs/<recipe>.py and --workdir=DIR (on a shared" \
       "filesystem: every node writes and resumes from it)" >&2
  exit 2
fi
outside="not in a SLURM allocation (use sbatch; --dry-run: set SLURM_JOB_NODELIST, SLURM_NNODES)"
: "${SLURM_JOB_NODELIST:?launch/slurm.sh: $outside}"
: "${SLURM_NNODES:?launch/slurm.sh: SLURM_NNODES is not set}"

# First host of a SLURM hostlist: scontrol when present, else the common forms by hand
# ("gpu[003-004,009]" -> gpu003, "a1,b2" -> a1).
first_host() {
  local list=$1 head
  if command -v scontrol > /dev/null 2>&1; then
    # Read it all (not `| head -n 1`: under pipefail, scontrol's SIGPIPE would end the job).
    local hosts
    hosts=$(scontrol show hostnames "$list")
    echo "${hosts%%$'\n'*}"
    return
  fi
  head=${list%%,*}
  if [[ $head != *"["* ]]; then echo "$head"; return; fi
  local prefix=${list%%\[*} range=${list#*\[}
  range=${range%%\]*}; range=${range%%,*}; range=${range%%-*}
  echo "${prefix}${range}"
}

here=${BASH_SOURCE[0]}
if [[ $here == */* ]]; then here=${here%/*}; else here=.; fi   # dirname, with builtins only
root=${CTXJAX_ROOT:-$(cd "$here/.." && pwd)}
if [ ! -f "$root/ctxjax/__init__.py" ]; then
  echo "launch/slurm.sh: no ctxjax checkout at '$root' (sbatch runs a copy of this script);" \
       "set CTXJAX_ROOT=/path/to/ctxjax" >&2
  exit 2
fi
venv=${CTXJAX_VENV:-$root/.venv}
if [ -n "${CTXJAX_PYTHON:-}" ]; then
  python=$CTXJAX_PYTHON
elif [ -x "$venv/bin/python" ]; then
  python=$venv/bin/python
  export VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH   # activation: the trainer's children too
else
  echo "launch/slurm.sh: no virtualenv at '$venv' (make it with launch/local.sh, or set" \
       "CTXJAX_VENV / CTXJAX_PYTHON)" >&2
  exit 2
fi

coordinator="$(first_host "$SLURM_JOB_NODELIST"):${CTXJAX_PORT:-12355}"
# SLURM_PROCID differs per task, so it is expanded by the task's own shell (single quotes);
# `exec` makes the trainer the process srun signals.
task='cd "$1" && python=$2 && shift 2 && exec "$python" -m ctxjax.train --process_id="$SLURM_PROCID" "$@"'
cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$task" ctxjax "$root" "$python"
     "--coordinator_address=$coordinator" "--num_processes=$SLURM_NNODES" "${args[@]}")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "ctxjax: coordinator $coordinator, $SLURM_NNODES process(es)" >&2
exec "${cmd[@]}"
