#!/usr/bin/env bash
# Create (or update) the virtual environment and install megasleep with its test extras.
#
# Why two pip steps: mamba-ssm and causal-conv1d have a setup.py that imports torch, so torch must be
# installed first and the rest with --no-build-isolation (an isolated build env would pull a
# multi-GB CUDA torch). On a machine without CUDA we install torch==2.13.0 (a CPU wheel) and the
# kernel packages without their CUDA extensions: their pure-PyTorch references serve as test oracles
# and megasleep runs on its own torch paths. With CUDA present the kernels are built for real, and
# every version (torch included) comes from launch/constraints-cuda.txt, as in the Dockerfile.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # the Dockerfile's pins (torch, triton, kernel packages, DeepSpeed): one consistent set, with the
  # Triton that FLA's Hopper GDN backward needs; MEGASLEEP_CONSTRAINTS points to another set
  CONSTRAINTS=${MEGASLEEP_CONSTRAINTS:-$(cd "$(dirname "$0")" && pwd)/constraints-cuda.txt}
  echo "[install] CUDA found: versions from $CONSTRAINTS, kernel packages built with their CUDA extensions"
  PIP+=(-c "$CONSTRAINTS")
  "${PIP[@]}" torch triton packaging wheel setuptools ninja
  MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    "${PIP[@]}" --no-build-isolation causal-conv1d mamba-ssm "fla-core[cuda]"
  DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation deepspeed
else
  echo "[install] no CUDA: CPU torch 2.13.0, kernel packages without CUDA builds (pure-PyTorch references;"\
       "their Triton kernels run under Triton's interpreter in the tests)"
  # the CUDA image's Triton, so the interpreter tests run the Triton that production runs
  TRITON_PIN=$(sed -n 's/^triton==//p' "$(cd "$(dirname "$0")" && pwd)/constraints-cuda.txt")
  "${PIP[@]}" torch==2.13.0 "triton==$TRITON_PIN"
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
  CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    "${PIP[@]}" --no-build-isolation --no-deps mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
  echo "[install] note: pip may report mamba-ssm's GPU-only requirements (tilelang, quack-kernels, apache-tvm-ffi)" \
       "as missing; they are left out on purpose on a CPU machine"
fi
"${PIP[@]}" --no-build-isolation -e ".[test]"
echo "[install] done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())')"
