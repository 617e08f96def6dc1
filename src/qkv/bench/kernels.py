"""Builds of qkv's native kernels for another CPU target, for the benchmarks.

qkv compiles each kernel of qkv/core/csrc for the machine it runs on (-march=native, qkv/core/_kernels.py).
To measure on one CPU what another runs (the narrow tiles of a CPU without AVX-512 on an AVX-512
machine, say), `build_for` compiles a kernel with -march=TARGET into a temporary folder and loads it;
benchmarks/decode.py and benchmarks/attention.py (`--march TARGET`) make it the kernel of their process.
"""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ..core import _kernels


def build_for(name: str, march: str, *, src_dir: Optional[Path] = None, defines: Sequence[str] = ()) -> ctypes.CDLL:
    """csrc/`name`.cpp built with -O3 -march=`march` (OpenMP where the compiler has it) and loaded.

    Args:
        name: the kernel's file name without .cpp, e.g. "decode_kernel" or "flash_fwd_kernel".
        march: a target GCC or Clang knows, e.g. "x86-64-v3" (AVX2) or "x86-64-v2" (SSE4.2), or
            "native": with qkv's own flags (qkv.core._kernels._FLAGS: -march=native, and
            -mprefer-vector-width=512 on x86), as qkv builds its kernels.
        src_dir: the folder holding the kernel's sources (default: this qkv's csrc), e.g. another
            revision's (benchmarks/kernels_ab.py).
        defines: macros for the compiler, e.g. ["QKV_SC=16"] (each as -D).

    Raises:
        RuntimeError: no C++ compiler, or the build failed (the compiler's message, e.g. for an
            unknown target).
    """
    cxx = _kernels._compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++, c++ or clang++; or set CXX)")
    src = (src_dir or Path(_kernels.__file__).with_name("csrc")) / f"{name}.cpp"
    if march == "native":  # qkv's own flags (-O3 -march=native, and -mprefer-vector-width=512 on x86)
        flags = [*_kernels._FLAGS, "-Wno-psabi"]
    else:
        flags = ["-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-pthread", "-Wno-psabi"]
    flags += [f"-D{d}" for d in defines]
    # The folder goes when the build is loaded (the loaded library stays mapped) or has failed.
    with tempfile.TemporaryDirectory(prefix=f"qkv-{name}-") as folder:
        so = Path(folder) / f"{name}-{march}.so"
        for extra in (["-fopenmp"], []):
            run = subprocess.run([cxx, *flags, *extra, "-o", str(so), str(src)], capture_output=True, text=True)
            if run.returncode == 0:
                return ctypes.CDLL(str(so))
    raise RuntimeError(f"the {name.replace('_', ' ')} did not build:\n{run.stderr[-2000:]}")
