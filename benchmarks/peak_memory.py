"""Peak memory of one piece of work, with the peak mark reset just before it.

CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` (bytes above what was
allocated before). CPU (Linux): glibc's free memory handed back with ``malloc_trim(0)`` (so RSS counts
live memory), the kernel's peak-RSS mark reset through ``/proc/self/clear_refs``, ``VmHWM`` read after
(bytes above the RSS before). The process-lifetime peak (``ru_maxrss``) is *not* a per-configuration
measurement: whatever ran earlier in the process (a bigger configuration, model building) hides it.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
from collections.abc import Callable


def rss_now() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux fallback
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def vm_hwm() -> int | None:
    """Peak RSS since the last reset_peak() (Linux VmHWM), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def malloc_trim() -> bool:
    """Give memory that glibc's malloc holds free back to the OS, so RSS counts live memory."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Bytes by which memory rose at its highest during ``fn()`` (see the module doc)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    malloc_trim()
    base = rss_now()
    if not reset_peak():
        raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs): per-run peak memory "
                           "needs Linux; run each configuration in a fresh process instead")
    fn()
    return max((vm_hwm() or 0) - base, 0)
