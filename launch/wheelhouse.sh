#!/usr/bin/env bash
# Wheels for a GPU node with no package index, whose Python already has torch and triton (a cluster's
# or a vendor's CUDA image): megasleep's other dependencies, fetched and built here, where PyPI is
# reachable, then installed there offline:
#
#   launch/wheelhouse.sh DIR [PYTHON_VERSION]     # here; PYTHON_VERSION is the node's (default 3.12)
#   python -m pip install --no-index --no-deps --target SITE DIR/*.whl        # there
#   export PYTHONPATH=SITE:$PWD                                               # (the repo's root)
#
# benchmarks/gpu_check.sh does the last two itself when WHEELHOUSE=DIR is set.
#
# What it holds: pydantic, DeepSpeed (its ops JIT-built on first use, DS_BUILD_OPS=0, as in the image),
# webdataset, fla-core, and mamba-ssm / causal-conv1d WITHOUT their CUDA extensions. Their compiled
# kernels must be built against the node's own torch with nvcc (launch/install.sh does that where CUDA
# is present); without them megasleep runs mamba-ssm's and FLA's Triton kernels and its own torch
# causal conv, and the kernel report (megasleep.ops._peers.kernel_report, printed at the top of the
# GPU check's report) says which kernel runs and why.
# Left out on purpose: what such an image has (numpy, pyyaml, einops, tqdm, safetensors, transformers,
# sentencepiece, ...), and tilelang (~43 MB), which only FLA's Hopper GDN backward with
# 3.4 <= triton < 3.7.1 would use; with such a triton that backward falls back to torch, and says so.
set -euo pipefail
DIR=${1:?usage: launch/wheelhouse.sh DIR [PYTHON_VERSION]}
PYVER=${2:-3.12}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
mkdir -p "$DIR"
PIP=("$PY" -m pip --disable-pip-version-check -q)
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# the versions megasleep is tested with (pyproject.toml, launch/constraints-cuda.txt)
pin() { grep -E "^$1==" "$ROOT/launch/constraints-cuda.txt" | head -1; }
# pydantic and what it needs (pydantic-core is compiled: it must match the node's Python)
"${PIP[@]}" download -d "$DIR" "${TARGET[@]}" "pydantic>=2.6" "hjson" "braceexpand>=0.1.7"
"${PIP[@]}" download -d "$DIR" --no-deps "${TARGET[@]}" "webdataset==1.0.2" "$(pin fla-core)"
# source-only packages whose setup.py imports torch: built here, without CUDA, against this torch
DS_BUILD_OPS=0 MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
CAUSAL_CONV1D_FORCE_BUILD=TRUE "${PIP[@]}" wheel -w "$DIR" --no-deps --no-build-isolation \
    "$(pin deepspeed)" "$(pin mamba-ssm)" "$(pin causal-conv1d)"
# What the node's Python must already have (checked below against every wheel's requirements and
# megasleep's own): a CUDA PyTorch image's usual set. Requirements left out on purpose: mamba-ssm's
# GPU-only tilelang / quack-kernels / apache-tvm-ffi (kernels megasleep does not call).
NODE_HAS="torch triton numpy pyyaml tqdm einops safetensors sentencepiece pyarrow matplotlib tensorboard
transformers packaging psutil msgpack ninja py-cpuinfo setuptools"
NOT_NEEDED="tilelang quack-kernels apache-tvm-ffi"
for w in "$DIR"/*.whl; do
  case "$(basename "$w")" in
    *-none-any.whl|*-cp"${PYVER/./}"-*|*-abi3-*) ;;
    *) echo "wheelhouse: $w is built for another Python than $PYVER; rebuild with that Python (PYTHON=...)" >&2
       exit 1 ;;
  esac
done
# every requirement (for that Python) is in the house at an allowed version, on the node, or left
# out on purpose
"$PY" "$ROOT/launch/wheelhouse_check.py" "$DIR" "$PYVER" --node-has $NODE_HAS --not-needed $NOT_NEEDED
echo "wheelhouse: $(find "$DIR" -maxdepth 1 -type f -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR (Python $PYVER)"
