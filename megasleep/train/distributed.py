"""Process-group setup and teardown: one process per device, under any launcher or plain ``python``.

Contract: :func:`setup_distributed` returns a :class:`DistContext` (rank, world, device, precision)
with the process group initialised; :func:`shutdown_distributed` ends it on every rank (barrier, then
destroy: without both, 10-25 % of 2-process CPU runs abort at exit with "terminate called without
an active exception").
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megasleep.config import ConfigError
from megasleep.models.precision import autocast_dtype, resolve_precision

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    precision: str                       # "fp32" | "bf16-autocast" | "bf16" (megasleep.models.precision)
    autocast_dtype: torch.dtype | None   # bf16 for both bf16 modes, or None

    def barrier(self) -> None:
        if dist.is_initialized() and self.world > 1:
            dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_world_size() -> int:
    """The world size the launcher promises (WORLD_SIZE), 1 for plain ``python``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wants_cuda(cfg) -> bool:
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def setup_distributed(cfg) -> DistContext:
    """Initialise the process group for experiment ``cfg``. Plain `python` gets a 1-rank group on a
    free port."""
    t = cfg.train
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    want_cuda = wants_cuda(cfg)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{cfg.source}: train.device=cuda but CUDA is not available")
    if not want_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    quiet_libraries()
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        _cpu_settings(cfg.deepspeed.shm_comm, cfg.train.compile)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if want_cuda else "gloo")
    prec = resolve_precision(t.precision, want_cuda)
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device,
                       precision=prec, autocast_dtype=autocast_dtype(prec))


def _cpu_settings(shm_comm: bool, compile_blocks: bool) -> None:
    if not (os.environ.get("MEGASLEEP_TORCH_COMPILE") or compile_blocks):
        # DeepSpeed's Muon wraps its Newton-Schulz iteration in torch.compile; on CPU that means an
        # inductor C++ build per matrix shape (minutes for a tiny model), for no gain here
        from torch._dynamo import config as dynamo_config

        dynamo_config.disable = True
    if not shm_comm:
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU on first use (~40 s per venv path);
        # gloo gives the same results, and CPU runs here are small. Opt in with deepspeed.shm_comm=true.
        # (deepspeed.ops documents edits of this dict as persistent.)
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown_distributed(barrier: bool = True) -> None:
    if dist.is_available() and dist.is_initialized():
        if barrier:
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()


def quiet_libraries() -> None:
    """DeepSpeed logs every init at INFO; keep warnings and errors only (MEGASLEEP_DS_VERBOSE=1 keeps all)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*", category=FutureWarning)
    if os.environ.get("MEGASLEEP_DS_VERBOSE"):
        return
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # our root module returns a SleepOutput dataclass; ZeRO-3's hooks on the root are not needed
    # (it owns no parameters), and the mixers' hidden-state parameters are handled by
    # register_external_params
    ds_logger.addFilter(lambda rec: "unknown inputs or outputs type" not in rec.getMessage())
