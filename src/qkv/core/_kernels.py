"""qkv's native kernels: C++ sources shipped in qkv/core/csrc, compiled on first use.

A kernel is plain C++17 (no torch headers), built once per machine with the C++ compiler
that torch's own compiled paths (torch.compile, FlexAttention) already need, with
`-O3 -march=native`, and loaded with ctypes, which releases the GIL during a call. The
library is cached under `$QKV_KERNEL_CACHE` (default `$XDG_CACHE_HOME/qkv/kernels`, else
`~/.cache/qkv/kernels`), named by a hash of the source, the compiler's version and the
flags, and written by qkv's one writer (`qkv._files`: a temporary file renamed into place),
so concurrent first uses and interrupted builds never leave a broken library under the
cache name.

Where no compiler is found or the build fails, `load` returns None and `status` says why;
callers then run their eager path and warn once (never silently). `QKV_NO_KERNELS=1`
turns the native kernels off (without a warning: the user asked for it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Optional

from .. import _files

_SRC = Path(__file__).with_name("csrc")
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"]
if platform.machine().lower() in ("x86_64", "amd64"):
    _FLAGS.append("-mprefer-vector-width=512")  # use the AVX-512 registers where the CPU has them
# OpenMP threads (torch's own libgomp, already in the process) where the compiler has it; the
# kernel falls back to std::thread without it (e.g. clang without libomp).
_OPENMP = "-fopenmp"
_lock = threading.Lock()
_loaded: dict[str, Optional[ctypes.CDLL]] = {}
_why: dict[str, str] = {}
_warned: set[str] = set()


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("QKV_KERNEL_CACHE"):
        return Path(os.environ["QKV_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qkv" / "kernels"


def _turned_off() -> bool:
    """Whether the user turned the native kernels off (QKV_NO_KERNELS set, and not to 0)."""
    return os.environ.get("QKV_NO_KERNELS", "") not in ("", "0")


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu() -> str:
    """What -march=native compiles for: the machine and its CPU's feature flags, so a cache
    shared between machines (a network home) never hands one CPU another's build."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build(name: str) -> ctypes.CDLL:
    """Compile csrc/<name>.cpp (or reuse the cached build) and load it; raises with the reason."""
    src = _SRC / f"{name}.cpp"
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (tried $CXX, g++, c++, clang++); install g++ "
                           "(Debian: apt-get install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = src.read_bytes() + "\0".join([version, " ".join(_FLAGS), _OPENMP, _cpu()]).encode()
    target = cache_dir() / f"{name}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # The compiler writes a temporary file that replaces `target` only when it is complete.
        with _files.atomic_output(target, what=f"the compiled {name} kernel") as tmp:
            run = subprocess.run([cxx, *_FLAGS, _OPENMP, "-o", str(tmp), str(src)], capture_output=True, text=True,
                                 timeout=300)
            if run.returncode != 0:  # once more without OpenMP: the kernel then uses std::thread
                run = subprocess.run([cxx, *_FLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True,
                                     timeout=300)
            if run.returncode != 0:
                raise RuntimeError(f"{os.path.basename(cxx)} failed on {src.name}: {run.stderr.strip()[-2000:]}")
    return ctypes.CDLL(str(target))


def load(name: str) -> Optional[ctypes.CDLL]:
    """The compiled kernel library `name` (csrc/<name>.cpp), or None where it cannot be had."""
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            lib = None
            if _turned_off():
                _why[name] = "turned off by QKV_NO_KERNELS"
            else:
                try:
                    lib = _build(name)
                    _why[name] = "compiled"
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _why[name] = str(exc)
            _loaded[name] = lib
    return _loaded[name]


def status(name: str) -> str:
    """'compiled', or why the kernel is not available."""
    load(name)
    return _why[name]


def warn_unavailable(name: str, what: str) -> None:
    """Warn once per kernel that `what` runs without its native kernel, and why; not where
    the user turned kernels off with QKV_NO_KERNELS (they asked for it)."""
    if name in _warned or _turned_off():
        return
    _warned.add(name)
    warnings.warn(f"qkv: the native {name} kernel is unavailable ({status(name)}); {what}",
                  RuntimeWarning, stacklevel=3)
