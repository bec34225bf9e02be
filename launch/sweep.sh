#!/usr/bin/env bash
#SBATCH --job-name=megasleep-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --array=1,2,4
# A sweep over the number of sleep passes N: one array task per N (the task id IS the N), each a full
# launch/pretrain.sh run (multi-node, preemption and requeue included) in its own run directory
# <run_dir>-N<N>, with the same seeds and data order for every N (the paper's protocol).
#
#   sbatch launch/sweep.sh [CONFIG.yaml] [key=value ...]                # N in {1, 2, 4}
#   sbatch --array=1-4 --gpus-per-node=8 launch/sweep.sh configs/experiments/rule110-t32.yaml
#   SWEEP_VALUES="1 2" bash launch/sweep.sh ...                         # no SLURM: one after another
# Each task takes whole nodes (--exclusive --mem=0, as launch/pretrain.sh). For one-GPU tasks that
# should share a node, replace that on the command line:
#   sbatch --array=1,2,4 --gpus-per-node=1 --oversubscribe --cpus-per-task=16 --mem=120G launch/sweep.sh CONFIG
set -uo pipefail
ROOT=${MEGASLEEP_ROOT:-}
for cand in "$ROOT" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" "$PWD"; do
  if [ -n "$cand" ] && [ -f "$cand/launch/common.sh" ]; then ROOT=$cand; break; fi
done
if [ -z "$ROOT" ] || [ ! -f "$ROOT/launch/common.sh" ]; then
  echo "[sweep] error: cannot find the megasleep repository (submit from the checkout or set MEGASLEEP_ROOT)" >&2; exit 2
fi
cd "$ROOT" || exit 2
MS_NAME=sweep
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"
ms_setup_env
export MEGASLEEP_ROOT=$ROOT
# the margin check in pretrain.sh reads this job's own #SBATCH --signal line
export MEGASLEEP_BATCH_SCRIPT=${MEGASLEEP_BATCH_SCRIPT:-$0}
if ! INFO=$("$PYTHON" "$ROOT/launch/run_info.py" "$@"); then
  ms_die "bad config or overrides: $*"
fi
BASE=${INFO%%$'\n'*}
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  N=$SLURM_ARRAY_TASK_ID
  echo "[sweep] array job ${SLURM_ARRAY_JOB_ID} task $N: sleep.passes=$N -> $BASE-N$N"
  exec bash "$ROOT/launch/pretrain.sh" "$@" "sleep.passes=$N" "run_dir=$BASE-N$N"
fi
rc=0
for N in ${SWEEP_VALUES:-1 2 4}; do
  echo "[sweep] sleep.passes=$N -> $BASE-N$N"
  bash "$ROOT/launch/pretrain.sh" "$@" "sleep.passes=$N" "run_dir=$BASE-N$N" || rc=$?
done
exit $rc
