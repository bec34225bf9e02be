# megasleep on CUDA: PyTorch + the kernel packages built with their CUDA extensions + DeepSpeed.
#
#   docker build -t megasleep .                         # add --build-arg CUDA_ARCHS="9.0" to build for one arch
#   docker run --gpus all --rm megasleep                # runs the test suite (GPU tests included)
#   docker run --gpus all --rm -v $PWD/runs:/workspace/megasleep/runs megasleep \
#       torchrun --standalone --nproc-per-node 8 -m megasleep.train.cli configs/experiments/rule110-t32.yaml
#
# The base image's torch is used as is (pyproject does not pin torch); mamba-ssm, causal-conv1d and
# DeepSpeed are built against it with --no-build-isolation (an isolated build would pull another torch).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
FROM ${BASE_IMAGE}

ARG CUDA_ARCHS="8.0;8.6;9.0"
ARG MAX_JOBS=8
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${CUDA_ARCHS} \
    MAX_JOBS=${MAX_JOBS} \
    HF_HUB_OFFLINE=1 \
    WANDB_MODE=offline

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# build tools for the CUDA extensions; versions follow the base image's Ubuntu release
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/*

# kernel packages, compiled from source for CUDA_ARCHS (FORCE_BUILD: no guessed prebuilt wheel)
RUN MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    pip install --no-cache-dir --no-build-isolation \
        packaging==24.2 wheel==0.45.1 \
        causal-conv1d==1.7.0 \
        mamba-ssm==2.3.2.post1 \
    && pip install --no-cache-dir fla-core==0.6.0 \
    && python -c "import causal_conv1d_cuda, selective_scan_cuda; print('kernels built')"

# DeepSpeed: its CUDA ops are JIT-compiled on first use (the trainer uses torch's AdamW / DeepSpeed's Muon,
# which need none); DS_BUILD_OPS=0 keeps the install fast and the image small
RUN DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8

WORKDIR /workspace/megasleep
# dependencies first (cached while only the code changes)
COPY pyproject.toml README.md ./
COPY megasleep/__init__.py megasleep/py.typed ./megasleep/
RUN pip install --no-cache-dir --no-build-isolation -e ".[test]"
COPY . .

RUN useradd --create-home --uid 1000 megasleep \
    && mkdir -p runs results \
    && chown -R megasleep:megasleep /workspace/megasleep
USER 1000:1000

# the test suite (CUDA kernel parity tests run when a GPU is visible: docker run --gpus all)
CMD ["python", "-m", "pytest", "-q", "-ra", "tests"]
