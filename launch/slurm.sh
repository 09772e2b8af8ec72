#!/usr/bin/env bash
# SLURM launcher for GPU clusters: one ctxjax process per node (each drives all of its GPUs),
# joined by jax.distributed with the allocation's first node as coordinator.
#
#   sbatch --nodes=2 launch/slurm.sh --config=configs/llama2_7b_8xh100.py --workdir=/shared/runs/x \
#       [--config.train.steps=10 ...]
#   bash launch/slurm.sh --dry-run --config=... --workdir=...   # print the commands, run nothing
#
# Inside the allocation the script derives, from SLURM's environment:
#   coordinator   first host of $SLURM_JOB_NODELIST, port $CTXJAX_PORT (default 12355)
#   num_processes $SLURM_NNODES (one task per node)
#   process_id    $SLURM_PROCID, read by each task itself (srun starts one per node)
# and passes them to the trainer as --coordinator_address --num_processes --process_id
# (ctxjax/train/distributed.py). CTXJAX_PYTHON overrides the interpreter (default python3).
#
#SBATCH --job-name=ctxjax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --output=ctxjax-%j.log
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
    scontrol show hostnames "$list" | head -n 1
    return
  fi
  head=${list%%,*}
  if [[ $head != *"["* ]]; then echo "$head"; return; fi
  local prefix=${list%%\[*} range=${list#*\[}
  range=${range%%\]*}; range=${range%%,*}; range=${range%%-*}
  echo "${prefix}${range}"
}

coordinator="$(first_host "$SLURM_JOB_NODELIST"):${CTXJAX_PORT:-12355}"
python=${CTXJAX_PYTHON:-python3}
# SLURM_PROCID differs per task, so it is expanded by the task's own shell (single quotes).
task='exec '"$python"' -m ctxjax.train --process_id="$SLURM_PROCID" "$@"'
cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$task" ctxjax
     "--coordinator_address=$coordinator" "--num_processes=$SLURM_NNODES" "${args[@]}")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "ctxjax: coordinator $coordinator, $SLURM_NNODES process(es)" >&2
exec "${cmd[@]}"
