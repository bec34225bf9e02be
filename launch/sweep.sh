#!/usr/bin/env bash
#SBATCH --job-name=megasleep-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
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
set -uo pipefail
ROOT=${MEGASLEEP_ROOT:-}
for cand in "$ROOT" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" "$PWD"; do
  if [ -n "$cand" ] && [ -f "$cand/launch/pretrain.sh" ]; then ROOT=$cand; break; fi
done
cd "$ROOT" || exit 2
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON MEGASLEEP_ROOT=$ROOT
if ! BASE=$("$PYTHON" -m megasleep.train.cli "$@" --print-run-dir); then
  echo "[sweep] bad config or overrides: $*" >&2; exit 2
fi
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
