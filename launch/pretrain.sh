#!/usr/bin/env bash
#SBATCH --job-name=megasleep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Whole nodes (--exclusive, --mem=0: every CPU and all memory) so that the ranks and their data
# workers are not squeezed onto SLURM's default of one CPU. GPUs: ask on the command line (no GPU
# request here, so that a bare `sbatch launch/pretrain.sh` is accepted by any cluster):
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/pretrain.sh CONFIG                        # torchrun per node
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 launch/pretrain.sh CONFIG    # one task per GPU
#   bash   launch/pretrain.sh [CONFIG.yaml] [key=value ...]     # the same run on this machine
#
# Pretraining with megasleep's DeepSpeed trainer. No CONFIG = configs/experiments/tiny-demo.yaml.
# * Either shape works (docs/slurm.md): one launcher task per node, each running torchrun with a
#   c10d rendezvous on the first node (ranks per node = GPUs of the node, or MEGASLEEP_CPU_RANKS on
#   nodes without GPUs); or one SLURM task per rank, started by srun, each seeing its own GPU.
# * Before any rank starts: the config and overrides are validated and checked against the world size
#   (`megasleep train ... --check-only --world-size W`); a GPU request on nodes where torch sees no
#   GPU is refused with one line.
# * Resumes automatically from the run directory's latest complete checkpoint.
# * Preemption: SLURM sends USR1 to this shell (--signal=B:USR1@300, ~5 min before the time limit;
#   or `scancel --batch --signal=USR1 JOB`). We ask the trainer to stop (a STOP file in the run dir:
#   every rank stops after the same step and saves), wait for it, then `scontrol requeue`; a failed
#   requeue is logged and the job exits 4. The margin is checked against the last measured save time.
# Environment: PYTHON (default: the repo's .venv if present), MEGASLEEP_CPU_RANKS, MASTER_PORT,
# MEGASLEEP_SIGNAL_MARGIN (seconds, when --signal is given on the sbatch command line),
# MEGASLEEP_DRY_RUN=1 (print each rank's launch environment instead of training),
# HF_HUB_OFFLINE / WANDB_MODE (offline by default), NCCL_* (see docs/slurm.md).
set -uo pipefail
MS_NAME=pretrain

# Under sbatch this file runs from a spool copy: find the repository from the submit directory.
ROOT=${MEGASLEEP_ROOT:-}
for cand in "$ROOT" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" "$PWD"; do
  if [ -n "$cand" ] && [ -f "$cand/launch/common.sh" ] && [ -d "$cand/megasleep" ]; then ROOT=$cand; break; fi
done
if [ -z "$ROOT" ] || [ ! -f "$ROOT/launch/common.sh" ]; then
  echo "[pretrain] error: cannot find the megasleep repository (submit from the checkout or set MEGASLEEP_ROOT)" >&2; exit 2
fi
cd "$ROOT" || exit 2
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"
ms_setup_env

# Traps first: a USR1 that arrives during the checks below must not kill this shell (bash's default).
PREEMPT=0 CHILD=
on_usr1() {
  local left=""
  if [ -n "${SLURM_JOB_ID:-}" ]; then left=$(ms_seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null)"); fi
  ms_log "USR1: asking the trainer to checkpoint and stop (${left:-unknown} s left; last save took ${SAVE_SECONDS:-?} s)"
  ms_check_margin "$left" "the time left at USR1"
  PREEMPT=1
  if [ -n "${CHILD:-}" ]; then touch "$RUN_DIR/STOP"; fi
}
on_term() {
  if [ -z "${CHILD:-}" ]; then ms_log "TERM before any rank started: exiting"; exit 143; fi
  ms_log "TERM: asking the trainer to checkpoint and stop"
  touch "$RUN_DIR/STOP"
}
requeue() {  # a failed requeue must not pass for a success: logged, exit 4
  local out
  ms_log "requeueing job $SLURM_JOB_ID"
  if ! out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
    echo "[pretrain] error: scontrol requeue $SLURM_JOB_ID failed: ${out:-no message}; the checkpoint is saved, resubmit the same command to resume" >&2
    exit 4
  fi
  exit 0
}
trap on_usr1 USR1
trap on_term TERM INT

ARGS=("$@")
if ! INFO=$("$PYTHON" "$ROOT/launch/run_info.py" "${ARGS[@]}"); then
  ms_die "bad config or overrides: ${ARGS[*]}"
fi
mapfile -t INFO_LINES <<< "$INFO"
RUN_DIR=${INFO_LINES[0]}; SAVE_SECONDS=${INFO_LINES[2]:-}
ms_plan
ms_preflight "${ARGS[@]}" train.device="$DEVICE"
mkdir -p "$RUN_DIR"
ms_log "job ${SLURM_JOB_ID:-local} restart ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) x $NPROC $DEVICE rank(s) (world $WORLD, one $([ "$SHAPE" = task ] && echo "task per rank" || echo "launcher per node")); run dir $RUN_DIR"
if [ -n "${SLURM_JOB_ID:-}" ]; then
  ms_check_margin "$(ms_signal_margin "${MEGASLEEP_BATCH_SCRIPT:-$0}")" "the preemption margin (--signal ...@N)"
fi
rm -f "$RUN_DIR/STOP"                       # stale request of an earlier run
if [ "$PREEMPT" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then requeue; fi   # USR1 during the checks: nothing to save
MEGASLEEP_LAUNCH_TIME=$(date +%s); export MEGASLEEP_LAUNCH_TIME

ms_launch -m megasleep.train.cli "${ARGS[@]}" train.device="$DEVICE"
if [ "$PREEMPT" = 1 ]; then touch "$RUN_DIR/STOP"; fi   # USR1 while the ranks were being started
ms_wait
if [ -n "${MEGASLEEP_DRY_RUN:-}" ]; then exit "$RC"; fi

STATE=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['state'])" "$RUN_DIR/status.json" 2>/dev/null || echo unknown)
ms_log "trainer exited with $RC, state $STATE"
if [ "$STATE" = done ]; then exit 0; fi
if [ "$STATE" = preempted ] || [ "$STATE" = time_limit ]; then
  if [ "$PREEMPT" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    requeue
  else
    ms_log "stopped with a checkpoint; run the same command again to resume"
  fi
  exit 0
fi
exit "$([ "$RC" -eq 0 ] && echo 1 || echo "$RC")"
