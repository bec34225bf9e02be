#!/usr/bin/env bash
# One rank of a one-task-per-rank job (`sbatch --ntasks-per-node=G --gpus-per-task=1 ...`):
# launch/pretrain.sh and launch/eval.sh run `srun bash launch/slurm-task.sh PYTHON -m ... ` and this
# script turns SLURM's task variables into what torch.distributed and DeepSpeed read, then execs.
#
#   RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_WORLD_SIZE = this node's task count,
#   LOCAL_RANK = this task's GPU among the GPUs it can see (the trainer and DeepSpeed use cuda:LOCAL_RANK):
#     * it sees one GPU (SLURM bound it: --gpus-per-task=1, --gpu-bind): 0, that GPU, its own;
#     * it sees every GPU of the node, one per task (--gpus-per-node=G with G tasks): SLURM_LOCALID;
#     * anything else would put two ranks on one GPU or leave GPUs idle: refused with one line.
#   MASTER_ADDR / MASTER_PORT come from the batch script (the first node of the allocation).
set -uo pipefail

expand_counts() {  # "2(x3),1" -> "2 2 2 1" (SLURM's compressed per-node task counts)
  local part out=()
  IFS=, read -r -a parts <<< "$1"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      for ((i = 0; i < BASH_REMATCH[2]; i++)); do out+=("${BASH_REMATCH[1]}"); done
    else
      out+=("$part")
    fi
  done
  echo "${out[@]}"
}

read -r -a per_node <<< "$(expand_counts "${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}")"
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE=${per_node[$SLURM_NODEID]:-1}
where="task $SLURM_PROCID on ${SLURMD_NODENAME:-$(hostname -s)}"

if [ "${MEGASLEEP_DEVICE:-cpu}" = cuda ]; then
  visible=0
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then visible=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .); fi
  if [ "$visible" -eq 1 ]; then
    LOCAL_RANK=0
  elif [ "$visible" -eq "$LOCAL_WORLD_SIZE" ]; then
    LOCAL_RANK=$SLURM_LOCALID
  else
    echo "[slurm-task] error: $where sees $visible GPU(s) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}) for $LOCAL_WORLD_SIZE task(s) on its node: ask one GPU per task (--gpus-per-task=1) or as many tasks per node as GPUs" >&2
    exit 2
  fi
else
  LOCAL_RANK=$SLURM_LOCALID
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
fi
export LOCAL_RANK

if [ -n "${MEGASLEEP_DRY_RUN:-}" ]; then
  echo "[dry-run] $where: RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} MASTER=${MASTER_ADDR:-}:${MASTER_PORT:-}"
  exit 0
fi
exec "$@"
