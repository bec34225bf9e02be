#!/usr/bin/env bash
#SBATCH --job-name=megasleep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# GPUs: ask on the command line, e.g. `sbatch --nodes=4 --gpus-per-node=8 launch/pretrain.sh CONFIG`
# (no GPU request here, so that a bare `sbatch launch/pretrain.sh` is accepted by any cluster).
#
# Pretraining with megasleep's DeepSpeed trainer.
#
#   sbatch launch/pretrain.sh [CONFIG.yaml] [key=value ...]     # on a SLURM cluster
#   bash   launch/pretrain.sh [CONFIG.yaml] [key=value ...]     # the same run on this machine
#
# No CONFIG = configs/experiments/tiny-demo.yaml (CPU-sized), so a bare command works anywhere.
# * One launcher task per node (srun --ntasks-per-node=1), each running torchrun with a c10d
#   rendezvous on the first node of the allocation; torchrun starts one rank per GPU that SLURM gave
#   the node, or, on nodes without GPUs, MEGASLEEP_CPU_RANKS ranks (default: --ntasks-per-node).
# * Resumes automatically from the run directory's latest complete checkpoint.
# * Preemption: SLURM sends USR1 to this shell (--signal=B:USR1@300, i.e. ~5 min before the time
#   limit; or `scancel --batch --signal=USR1 JOB`). We ask the trainer to stop (a STOP file in the
#   run dir: every rank stops after the same step and saves), wait for it, then `scontrol requeue`.
#   The requeued job resumes from that checkpoint; the log continues (--open-mode=append).
# Environment: PYTHON (default: the repo's .venv if present), MEGASLEEP_CPU_RANKS, MASTER_PORT,
# and for offline clusters HF_HUB_OFFLINE=1 / WANDB_MODE=offline (W&B runs offline by default).
set -uo pipefail

# Under sbatch this file runs from a spool copy: find the repository from the submit directory.
ROOT=${MEGASLEEP_ROOT:-}
for cand in "$ROOT" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" "$PWD"; do
  if [ -n "$cand" ] && [ -f "$cand/launch/pretrain.sh" ] && [ -d "$cand/megasleep" ]; then ROOT=$cand; break; fi
done
if [ -z "$ROOT" ] || [ ! -d "$ROOT/megasleep" ]; then
  echo "[pretrain] cannot find the megasleep repository (set MEGASLEEP_ROOT)" >&2; exit 2
fi
cd "$ROOT" || exit 2
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false

ARGS=("$@")
if ! RUN_DIR=$("$PYTHON" -m megasleep.train.cli "${ARGS[@]}" --print-run-dir); then
  echo "[pretrain] bad config or overrides: ${ARGS[*]}" >&2; exit 2
fi
mkdir -p "$RUN_DIR"

# ---- ranks per node: GPUs if SLURM (or the machine) gives any, else CPU ranks
count_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]; then
    echo "${CUDA_VISIBLE_DEVICES}" | tr ',' '\n' | grep -c .
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"
  elif [ -z "${SLURM_JOB_ID:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c GPU
  else echo 0; fi
}
GPUS=$(count_gpus)
if [ "${GPUS:-0}" -gt 0 ]; then
  NPROC=$GPUS; DEVICE=cuda
else
  NPROC=${MEGASLEEP_CPU_RANKS:-${SLURM_NTASKS_PER_NODE:-1}}; NPROC=${NPROC%%(*}; DEVICE=cpu
  CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))}
fi
NNODES=${SLURM_NNODES:-1}
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-$$} % 20000 ))}
echo "[pretrain] $(date -Is) job ${SLURM_JOB_ID:-local} restart ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) x $NPROC $DEVICE rank(s); run dir $RUN_DIR"

PREEMPT=0
rm -f "$RUN_DIR/STOP"                       # stale request of an earlier run
MEGASLEEP_LAUNCH_TIME=$(date +%s); export MEGASLEEP_LAUNCH_TIME
on_usr1() {
  echo "[pretrain] $(date -Is) USR1: asking the trainer to checkpoint and stop"
  PREEMPT=1
  touch "$RUN_DIR/STOP"
}
on_term() {
  echo "[pretrain] $(date -Is) TERM: asking the trainer to checkpoint and stop"
  touch "$RUN_DIR/STOP"
}
trap on_usr1 USR1
trap on_term TERM INT

TRAIN=("$PYTHON" -m megasleep.train.cli "${ARGS[@]}" train.device="$DEVICE")
if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null 2>&1; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR
  srun --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${SLURM_JOB_ID}" \
    --max-restarts=0 -m megasleep.train.cli "${ARGS[@]}" train.device="$DEVICE" &
elif [ "$NPROC" -gt 1 ]; then
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
    -m megasleep.train.cli "${ARGS[@]}" train.device="$DEVICE" &
else
  "${TRAIN[@]}" &
fi
CHILD=$!
# `wait` returns early (status > 128) when a trapped signal arrives: keep waiting for the trainer.
while true; do
  wait "$CHILD"; RC=$?
  if [ "$RC" -gt 128 ] && kill -0 "$CHILD" 2>/dev/null; then continue; fi
  break
done

STATE=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['state'])" "$RUN_DIR/status.json" 2>/dev/null || echo unknown)
echo "[pretrain] $(date -Is) trainer exited with $RC, state $STATE"
if [ "$STATE" = done ]; then exit 0; fi
if [ "$STATE" = preempted ] || [ "$STATE" = time_limit ]; then
  if [ "$PREEMPT" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "[pretrain] requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "[pretrain] stopped with a checkpoint; run the same command again to resume"
  fi
  exit 0
fi
exit "$([ "$RC" -eq 0 ] && echo 1 || echo "$RC")"
