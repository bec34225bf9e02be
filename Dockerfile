# megasleep on CUDA: PyTorch + the kernel packages built with their CUDA extensions + DeepSpeed.
#
#   docker build -t megasleep .                         # add --build-arg CUDA_ARCHS="9.0" to build for one arch
#   docker run --gpus all --rm megasleep                # runs the test suite (GPU tests included)
#   docker run --gpus all --rm -v $PWD/runs:/workspace/megasleep/runs megasleep \
#       torchrun --standalone --nproc-per-node 8 -m megasleep.train.cli configs/experiments/rule110-t32.yaml
#
# Every Python package version comes from launch/constraints-cuda.txt (the same file launch/install.sh
# uses on GPU machines): torch 2.13.0 with triton 3.7.1, which mamba-ssm needs (>= 3.5) and with
# which FLA runs its gated-delta-rule backward on Hopper (it refuses 3.4.0 <= triton < 3.7.1).
# torch is installed first and the kernel packages are compiled against it with --no-build-isolation
# and the same constraints, so nothing can swap torch after the kernels are built.
# torch 2.13.0's PyPI wheels are CUDA 13.0 builds: the host needs an NVIDIA driver >= 580.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

ARG CUDA_ARCHS="8.0;8.6;9.0"
ARG MAX_JOBS=8
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${CUDA_ARCHS} \
    MAX_JOBS=${MAX_JOBS} \
    HF_HUB_OFFLINE=1 \
    WANDB_MODE=offline \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.12 (Ubuntu 24.04's) in a venv, and build tools for the CUDA extensions; apt versions
# follow the base image's Ubuntu release
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

COPY launch/constraints-cuda.txt /opt/megasleep/constraints-cuda.txt

# torch first: the kernel packages' setup.py imports it (versions: the constraints file)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c /opt/megasleep/constraints-cuda.txt torch triton packaging wheel setuptools ninja

# kernel packages, compiled from source for CUDA_ARCHS (FORCE_BUILD: no guessed prebuilt wheel)
# hadolint ignore=DL3013
RUN MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    pip install --no-cache-dir --no-build-isolation -c /opt/megasleep/constraints-cuda.txt \
        causal-conv1d mamba-ssm "fla-core[cuda]" \
    && python -c "import causal_conv1d_cuda, selective_scan_cuda; print('kernels built')"

# DeepSpeed: its CUDA ops are JIT-compiled on first use (the trainer uses torch's AdamW / DeepSpeed's Muon,
# which need none); DS_BUILD_OPS=0 keeps the install fast and the image small
# hadolint ignore=DL3013
RUN DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation -c /opt/megasleep/constraints-cuda.txt deepspeed

WORKDIR /workspace/megasleep
# dependencies first (cached while only the code changes)
COPY pyproject.toml README.md ./
COPY megasleep/__init__.py megasleep/py.typed ./megasleep/
RUN pip install --no-cache-dir --no-build-isolation -c /opt/megasleep/constraints-cuda.txt -e ".[test]" \
    && python -c "import importlib.metadata as m; pins = [l.strip().split('==') for l in open('/opt/megasleep/constraints-cuda.txt') if '==' in l and not l.startswith('#')]; bad = [(n, v, m.version(n)) for n, v in pins if m.version(n).split('+')[0] != v]; assert not bad, f'installed versions differ from the constraints: {bad}'"
COPY . .

# Ubuntu 24.04 images come with a user 'ubuntu' holding uid 1000
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 megasleep \
    && mkdir -p runs results \
    && chown -R megasleep:megasleep /workspace/megasleep
USER 1000:1000

# the test suite (CUDA kernel parity tests run when a GPU is visible: docker run --gpus all)
CMD ["python", "-m", "pytest", "-q", "-ra", "tests"]
