#!/usr/bin/env bash
#SBATCH --job-name=megasleep-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Evaluate a training run's latest checkpoint at several sleep depths N (the experiment's eval
# section: eval.eval_passes, eval.samples; data from data.val or the task generator's val split).
# Writes <run_dir>/eval.json and eval records in <run_dir>/metrics.jsonl.
#
#   sbatch launch/eval.sh [CONFIG.yaml] [key=value ...]       # e.g. "eval.eval_passes=[1,2,4,8]"
#   sbatch --nodes=2 --gpus-per-node=8 launch/eval.sh CONFIG  # as many ranks as you like
#   bash   launch/eval.sh configs/experiments/rule110-t32.yaml sleep.passes=2 "eval.eval_passes=[1,2,4,8]"
#
# Ranks are started exactly as launch/pretrain.sh starts them (either submission shape, GPUs or
# MEGASLEEP_CPU_RANKS CPU ranks), so a checkpoint saved by a multi-GPU run is evaluated by a
# multi-rank job; the evaluation samples are split over the ranks. Use the same CONFIG and overrides
# as the training run (they name its run directory). For exported or released models, and
# per-difficulty bootstrap intervals and plots, use `megasleep eval`.
set -uo pipefail
MS_NAME=eval
ROOT=${MEGASLEEP_ROOT:-}
for cand in "$ROOT" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" "$PWD"; do
  if [ -n "$cand" ] && [ -f "$cand/launch/common.sh" ]; then ROOT=$cand; break; fi
done
if [ -z "$ROOT" ] || [ ! -f "$ROOT/launch/common.sh" ]; then
  echo "[eval] error: cannot find the megasleep repository (submit from the checkout or set MEGASLEEP_ROOT)" >&2; exit 2
fi
cd "$ROOT" || exit 2
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"
ms_setup_env
if ! INFO=$("$PYTHON" "$ROOT/launch/run_info.py" "$@"); then
  ms_die "bad config or overrides: $*"
fi
mapfile -t INFO_LINES <<< "$INFO"
ms_plan
ms_preflight "$@" train.device="$DEVICE"   # the DeepSpeed engine it loads into splits the batch too
ms_log "evaluating the latest checkpoint in ${INFO_LINES[1]} with $WORLD $DEVICE rank(s)"
ms_launch -m megasleep.train.cli "$@" train.device="$DEVICE" --eval-only
ms_wait
exit "$RC"
