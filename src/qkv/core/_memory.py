"""Memory before work: every backend estimates what a call would allocate, and the dispatch
refuses a call that cannot fit before anything is allocated, naming the estimate and a
backend that fits.

An allocation that cannot succeed otherwise fails deep inside torch ("DefaultCPUAllocator:
not enough memory", after minutes of swapping or the kernel's OOM killer), or, for an input
expanded with stride 0 (a 10^6-token query costs 8 bytes), asks for a terabyte. Estimates
count the tensors a backend materialises beyond its inputs and output (score matrices, dense
masks, upcast copies, gradients); they are compared with the memory the device has free now
(`MemAvailable` of /proc/meminfo on the CPU, `torch.cuda.mem_get_info` on a GPU).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .spec import AttentionSpec

# Estimates below this are not compared with the free memory (reading it costs a file read).
ALWAYS_FITS = 256 << 20


def available(device) -> Optional[int]:
    """Bytes the device can still allocate, or None where that cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fmt(nbytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"  # pragma: no cover


def itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def compute_size(dtype: torch.dtype) -> int:
    """Bytes per element of the compute dtype: float64 stays, everything else is float32."""
    return 8 if dtype == torch.float64 else 4


def linear(spec: AttentionSpec, q: Tensor, block_entries: int = 1 << 20) -> int:
    """The working set of an engine whose memory is linear in length: keys, values, queries and
    output upcast to the compute dtype, their gradients when autograd records, and a few
    blocks of scores."""
    c = compute_size(q.dtype)
    rows = spec.B * spec.Hq * spec.Lq * (spec.D + spec.Dv)  # q and out
    keys = spec.B * spec.Hkv * spec.Lk * (spec.D + spec.Dv + 1)  # k, v (and a column of ones)
    grad = 2 if spec.grad else 1
    return grad * c * (rows + keys) + 4 * c * block_entries


def quadratic(spec: AttentionSpec, copies: float, size: int) -> int:
    """`copies` tensors of B * Hq * Lq * Lk elements of `size` bytes."""
    return int(copies * size * spec.B * spec.Hq * spec.Lq * spec.Lk)
