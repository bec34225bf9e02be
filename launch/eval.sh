#!/usr/bin/env bash
#SBATCH --job-name=megasleep-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Evaluate a training run's latest checkpoint at several sleep depths N (the experiment's eval
# section: eval.passes, eval.samples; data from data.val or the task generator's val split).
# Writes <run_dir>/eval.json and eval records in <run_dir>/metrics.jsonl.
#
#   sbatch launch/eval.sh [CONFIG.yaml] [key=value ...]       # e.g. "eval.passes=[1,2,4,8]"
#   bash   launch/eval.sh configs/experiments/rule110-t32.yaml sleep.passes=2 "eval.passes=[1,2,4,8]"
#
# Use the same CONFIG and overrides as the training run (they name its run directory). For exported
# or released models, and per-difficulty bootstrap intervals and plots, use `megasleep eval`.
set -uo pipefail
ROOT=${MEGASLEEP_ROOT:-}
for cand in "$ROOT" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" "$PWD"; do
  if [ -n "$cand" ] && [ -f "$cand/launch/pretrain.sh" ]; then ROOT=$cand; break; fi
done
cd "$ROOT" || exit 2
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} WANDB_MODE=${WANDB_MODE:-offline}
DEVICE=cpu
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] || [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then DEVICE=cuda; fi
exec "$PYTHON" -m megasleep.train.cli "$@" train.device="$DEVICE" --eval-only
