# Shared by launch/pretrain.sh, launch/eval.sh and launch/sweep.sh (sourced, not run): how many
# ranks, on which devices, started by which launcher. See docs/slurm.md for the two submission shapes.
#
# After `ms_plan`:
#   SHAPE   node: one launcher task per node, torchrun starts NPROC ranks there
#                 (`sbatch --nodes=K --gpus-per-node=G`, or no SLURM at all);
#           task: one SLURM task per rank, srun starts them (`--ntasks-per-node=G --gpus-per-task=1`,
#                 or any job with more tasks than nodes); launch/slurm-task.sh derives each rank's
#                 RANK / LOCAL_RANK / WORLD_SIZE from SLURM_* and picks its GPU.
#   DEVICE  cuda or cpu;  NNODES;  NPROC (ranks per node, node shape);  WORLD (all ranks).
# `ms_launch CMD...` starts CMD (a `-m module args...` tail for python) on every rank in the
# background and sets CHILD to the pid to wait for.

ms_log() { echo "[$MS_NAME] $(date -Is) $*"; }
ms_die() { echo "[$MS_NAME] error: $*" >&2; exit 2; }

# Python and the environment every rank shares. NCCL: only settings that are safe on any cluster;
# the fabric-specific ones (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are the site's, see docs/slurm.md.
ms_setup_env() {
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
  fi
  export PYTHON PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
  export WANDB_MODE=${WANDB_MODE:-offline}
  # a rank whose collective fails or times out aborts the job instead of hanging until the time limit
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
}

# Number of GPUs this (batch) shell was given: SLURM's allocation, else the machine's.
ms_count_gpus() {
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]; then
    echo "${CUDA_VISIBLE_DEVICES}" | tr ',' '\n' | grep -c .
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"
  elif [ -z "${SLURM_JOB_ID:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c GPU
  else echo 0; fi
}

ms_plan() {
  local gpus
  gpus=$(ms_count_gpus)
  NNODES=${SLURM_NNODES:-1}
  if [ -n "${SLURM_JOB_ID:-}" ] && { [ "${SLURM_NTASKS:-1}" -gt "$NNODES" ] || [ -n "${SLURM_GPUS_PER_TASK:-}" ]; }; then
    SHAPE=task; WORLD=$SLURM_NTASKS; NPROC=$(( WORLD / NNODES ))
  else
    SHAPE=node
    if [ "$gpus" -gt 0 ]; then NPROC=$gpus; else NPROC=${MEGASLEEP_CPU_RANKS:-${SLURM_NTASKS_PER_NODE:-1}}; fi
    NPROC=${NPROC%%(*}; WORLD=$(( NNODES * NPROC ))
  fi
  if [ "$gpus" -gt 0 ]; then DEVICE=cuda; else DEVICE=cpu; fi
  if [ "$DEVICE" = cuda ] && [ -z "${MEGASLEEP_DRY_RUN:-}" ]; then
    # a GPU request on a node without a usable GPU: one line now, not a CUDA traceback per rank
    local seen
    seen=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo "?")
    if [ "$seen" = "?" ] || [ "$seen" -lt 1 ]; then
      ms_die "this job was given $gpus GPU(s) on ${SLURMD_NODENAME:-$(hostname -s)} (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}) but $PYTHON sees no CUDA device (torch.cuda.device_count()=$seen); submit with --gpus-per-node=0 to run on CPUs, or use a CUDA build of torch"
    fi
  fi
  local cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
  CPUS_PER_RANK=$(( cpus / NPROC > 0 ? cpus / NPROC : 1 ))
  if [ "$DEVICE" = cpu ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_RANK}; fi
  export MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-$$} % 20000 ))}
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1); export MASTER_ADDR
  fi
  export MEGASLEEP_DEVICE=$DEVICE
}

# Refuse, before any rank starts, a batch setting that cannot divide over WORLD ranks (and any other
# config error): `megasleep train ... --check-only` exits 2 with one line naming config and world size.
ms_preflight() {
  local err
  if ! err=$("$PYTHON" -m megasleep.cli train "$@" --check-only --world-size "$WORLD" 2>&1 >/dev/null); then
    ms_die "preflight for $WORLD rank(s) failed: ${err##*$'\n'}"
  fi
}

ms_launch() {
  if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null 2>&1; then
    if [ "$SHAPE" = task ]; then
      srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-$CPUS_PER_RANK}" \
        bash "$ROOT/launch/slurm-task.sh" "$PYTHON" "$@" &
    elif [ -n "${MEGASLEEP_DRY_RUN:-}" ]; then
      srun --ntasks="$NNODES" --ntasks-per-node=1 bash -c \
        'echo "[dry-run] node $SLURM_NODEID ($SLURMD_NODENAME): torchrun --nnodes=$0 --nproc-per-node=$1 --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"' \
        "$NNODES" "$NPROC" &
    else
      srun --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
        "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC" \
        --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
        --max-restarts=0 "$@" &
    fi
  elif [ -n "${MEGASLEEP_DRY_RUN:-}" ]; then
    echo "[dry-run] local: $NPROC $DEVICE rank(s)" &
  elif [ "$NPROC" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" "$@" &
  else
    "$PYTHON" "$@" &
  fi
  CHILD=$!
}

# `wait` returns early (status > 128) when a trapped signal arrives: keep waiting for the ranks.
ms_wait() {
  while true; do
    wait "$CHILD"; RC=$?
    if [ "$RC" -gt 128 ] && kill -0 "$CHILD" 2>/dev/null; then continue; fi
    break
  done
}

# Seconds in a SLURM duration ([D-]HH:MM:SS, MM:SS, ...); nothing for UNLIMITED / INVALID.
ms_seconds() {
  local t=$1 d=0 h=0 m=0 s=0
  [[ $t =~ ^[0-9:-]+$ ]] || return 0
  if [[ $t == *-* ]]; then d=${t%%-*}; t=${t#*-}; fi
  IFS=: read -r -a p <<< "$t"
  case ${#p[@]} in
    3) h=${p[0]}; m=${p[1]}; s=${p[2]} ;;
    2) if [ "$d" -gt 0 ]; then h=${p[0]}; m=${p[1]}; else m=${p[0]}; s=${p[1]}; fi ;;
    1) if [ "$d" -gt 0 ]; then h=${p[0]}; else m=${p[0]}; fi ;;
  esac
  echo $(( 10#$d * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s ))
}

# The preemption margin: seconds between SLURM's USR1 and the time limit, from
# MEGASLEEP_SIGNAL_MARGIN, SBATCH_SIGNAL, or the batch script's `#SBATCH --signal=...@N` line
# (a `--signal` given on the sbatch command line is invisible to the job: set MEGASLEEP_SIGNAL_MARGIN).
ms_signal_margin() {
  local spec=${SBATCH_SIGNAL:-}
  if [ -n "${MEGASLEEP_SIGNAL_MARGIN:-}" ]; then echo "$MEGASLEEP_SIGNAL_MARGIN"; return; fi
  if [ -z "$spec" ] && [ -f "$1" ]; then
    spec=$(sed -n 's/^#SBATCH[[:space:]]\+--signal=\([^[:space:]]*\).*/\1/p' "$1" | tail -n 1)
  fi
  [ -n "$spec" ] || return 0
  if [[ $spec == *@* ]]; then echo "${spec##*@}"; else echo 60; fi  # sbatch's default is 60 s
}

# Warn when the time SLURM leaves after USR1 is shorter than the last measured checkpoint save
# (SAVE_SECONDS, from the run's latest checkpoint marker): the job would be killed mid-save.
ms_check_margin() {
  local margin=$1 what=$2
  [ -n "$margin" ] && [ -n "${SAVE_SECONDS:-}" ] || return 0
  if awk -v m="$margin" -v s="$SAVE_SECONDS" 'BEGIN { exit !(m < s) }'; then
    echo "[$MS_NAME] warning: $what is ${margin}s but the last checkpoint save took ${SAVE_SECONDS}s: the job can be killed before it saves; raise --signal=B:USR1@<seconds> (and MEGASLEEP_SIGNAL_MARGIN) above the save time plus one step" >&2
  fi
}
