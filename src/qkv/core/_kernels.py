"""qkv's native kernels: C++ sources shipped in qkv/core/csrc, compiled on first use.

A kernel is plain C++17 (no torch headers), built once per machine with the C++ compiler
that torch's own compiled paths (torch.compile, FlexAttention) already need, with
`-O3 -march=native`, and loaded with ctypes, which releases the GIL during a call. The
library is cached under `$QKV_KERNEL_CACHE` (default `$XDG_CACHE_HOME/qkv/kernels`, else
`~/.cache/qkv/kernels`), named by a hash of the source (with the csrc/ headers it includes
by `#include "..."`), the compiler's version, the flags and the CPU, and written by qkv's
one writer (`qkv._files`: a temporary file renamed into place), so concurrent first uses
and interrupted builds never leave a broken library under the cache name; temporary files
that a killed build left behind are removed once they are older than any build can take.

A damaged cache must not kill the process: loading a truncated library can raise SIGBUS,
and a library lacking a function fails on every call. So a build is followed by its checksum,
`NAME.so.sha256` (sha256sum's format), written after the library; a cached library is loaded
only when its checksum matches, and must export the functions of `EXPORTS`. A cached build
that fails either check (or has no checksum: a build cut short, or made by an older qkv) is
deleted and built again, once; a damaged one says so in one warning.

Where no compiler is found or the build (or the rebuild) fails, `load` returns None and
`status` says why; callers then run their eager path and warn once (never silently), naming
the cache and `QKV_KERNEL_CACHE` where the cache is at fault. `QKV_NO_KERNELS=1` turns the
native kernels off (without a warning: the user asked for it).
"""

from __future__ import annotations

import _ctypes
import ctypes
import errno
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Optional

from .. import _files

_SRC = Path(__file__).with_name("csrc")
# The functions each kernel's callers use; a library without one of them is not loaded.
EXPORTS = {"decode_kernel": ("qkv_decode", "qkv_decode_partials", "qkv_decode_has_bf16_dot", "qkv_decode_version",
                             "qkv_decode_vector_width", "qkv_decode_has_fma"),
           "flash_fwd_kernel": ("qkv_flash_fwd", "qkv_flash_fwd_version", "qkv_flash_has_bf16_dot",
                                 "qkv_flash_vector_width", "qkv_flash_has_fma", "qkv_flash_amx"),
           "flash_bwd_kernel": ("qkv_flash_bwd", "qkv_flash_bwd_version", "qkv_flash_bwd_amx")}
# Temporary files of a build older than this are leftovers of a killed process: longer than
# the two compiler runs of a build (300 s each) can take.
_STALE_S = 900
# The temporary names of builds by qkv before `qkv._files` (tempfile.mkstemp(prefix=".NAME-", suffix=".so")).
_OLD_TEMP = re.compile(r"\.[a-z_]+-[a-z0-9_]{8}\.so")
_NO_CHECKSUM = "it has no checksum"
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


def _cpuinfo() -> tuple[str, list[str]]:
    """/proc/cpuinfo's first 64 KiB and its first flags line, split; ("", []) where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(1 << 16)
    except OSError:
        return "", []
    return info, next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])


def _field(info: str, name: str) -> str:
    """A field of /proc/cpuinfo's text ("cpu family", "model"; "" where it has none)."""
    return next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.split(":", 1)[0].strip() == name), "")


def _first_kind(info: str, flags: list[str]) -> bool:
    return ("AuthenticAMD" in info and _field(info, "cpu family") in ("25", "26") and "avx512_bf16" in flags
            and "amx_tile" not in flags)


@functools.lru_cache(maxsize=1)
def measured_cpu() -> bool:
    """Whether this CPU is of the first kind the native FlashAttention-2 kernels' `auto` rules were
    measured on (backend/native.py, backend/sparse.py): AMD with AVX512-BF16 and no AMX, of the families
    timed: 25 (Zen 4) and 26 (Zen 5, where the rules were timed again and go further: `zen5_cpu`), read
    from /proc/cpuinfo; False where it cannot be read. The second kind: `amx_cpu`; the third: `avx2_cpu`.
    On other kinds those rules claim nothing."""
    return _first_kind(*_cpuinfo())


@functools.lru_cache(maxsize=1)
def zen5_cpu() -> bool:
    """Whether this CPU is the first kind's server Zen 5 (family 26, models 0-31: the EPYC parts, whose
    AVX-512 units are 512 bits wide; a model 2 was timed), where the native kernels' `auto` rules were timed
    again and claim more (backend/native.py, ZEN5_AUTO_MIN_CELLS; backend/decode.py), read from
    /proc/cpuinfo. Other family 26 models (the laptop parts, whose AVX-512 runs on 256-bit units as Zen 4's)
    take the first kind's rules alone."""
    info, flags = _cpuinfo()
    model = _field(info, "model")
    return _first_kind(info, flags) and _field(info, "cpu family") == "26" and model.isdigit() and int(model) < 32
@functools.lru_cache(maxsize=1)
def amx_cpu() -> bool:
    """Whether this CPU is of the second kind the native backend's `auto` rule was measured on
    (backend/native.py): an Intel Xeon with AMX-BF16 (and AVX512-BF16), read from /proc/cpuinfo."""
    info, flags = _cpuinfo()
    return "GenuineIntel" in info and {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(flags)


@functools.lru_cache(maxsize=1)
def avx2_cpu() -> bool:
    """Whether this CPU is of the third kind the native backend's `auto` rule was measured on
    (backend/native.py): an AMD Zen 3 (family 25) whose widest vectors are AVX2's (avx2 and fma, no
    avx512f: Zen 4, also family 25, has AVX-512 and is the first kind), read from /proc/cpuinfo. The
    kernels build their narrow tiles there (8-float vectors)."""
    info, flags = _cpuinfo()
    return ("AuthenticAMD" in info and _field(info, "cpu family") == "25" and {"avx2", "fma"} <= set(flags)
            and "avx512f" not in flags)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksum_file(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _damage(lib: Path) -> Optional[str]:
    """Why the cached library `lib` must not be loaded, or None when its checksum matches.
    The library itself is only read, never loaded, so a truncated file cannot crash the process."""
    try:
        recorded = _checksum_file(lib).read_text(encoding="ascii").split()[:1]
    except FileNotFoundError:
        return _NO_CHECKSUM
    except (OSError, ValueError) as exc:
        return f"its checksum is unreadable ({exc})"
    try:
        actual = _sha256(lib)
    except OSError as exc:
        return f"it is unreadable ({exc})"
    return None if recorded == [actual] else "its checksum does not match (the file is damaged)"


def _discard(lib: Path) -> None:
    """Delete a cached library and its checksum (a process that has it loaded keeps its copy)."""
    for path in (_checksum_file(lib), lib):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _compile(cxx: str, src: Path, target: Path) -> None:
    """Compile `src` into the library `target`, then write its checksum; raises with the reason.

    The compiler writes a temporary file that replaces `target` only when it is complete (and
    is removed if the build fails, is interrupted or the process is terminated)."""
    with _files.atomic_output(target, what=f"the compiled {src.stem} kernel") as tmp:
        run = subprocess.run([cxx, *_FLAGS, _OPENMP, "-o", str(tmp), str(src)], capture_output=True, text=True,
                             timeout=300)
        if run.returncode != 0:  # once more without OpenMP: the kernel then uses std::thread
            run = subprocess.run([cxx, *_FLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cxx)} failed on {src.name}: {run.stderr.strip()[-2000:]}")
        digest = _sha256(tmp)  # of this build, whatever another process renames over it meanwhile
    # After the library: a build cut short between the two leaves a library without a checksum,
    # which the next use rebuilds.
    _files.write_text(_checksum_file(target), f"{digest}  {target.name}\n", what=f"the checksum of {target.name}")


def _open(name: str, lib: Path) -> ctypes.CDLL:
    """Load `lib` with ctypes and check that it exports EXPORTS[name]; raises OSError otherwise."""
    handle = ctypes.CDLL(str(lib))
    missing = [fn for fn in EXPORTS.get(name, ()) if not hasattr(handle, fn)]
    if missing:
        # Unloaded where the C library can (dlclose), so that a rebuild at the same path is read
        # anew rather than found among the libraries already open.
        close = getattr(_ctypes, "dlclose", None)
        if close is not None:
            close(handle._handle)
        raise OSError(f"it lacks {', '.join(missing)}")
    return handle


def _cache_note(folder: Path) -> str:
    return (f"the kernel cache is {folder}, set by QKV_KERNEL_CACHE: delete the files there, or point "
            f"QKV_KERNEL_CACHE at another folder")


_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.M)


def source_bytes(src: Path, seen: Optional[set] = None) -> bytes:
    """The bytes of `src` followed by those of each csrc/ header it includes by `#include "..."`,
    recursively, each once: what a build of `src` depends on, so that a header change renames the
    cached library (a header outside csrc/ is an error: kernels include only their own)."""
    seen = set() if seen is None else seen
    text = src.read_bytes()
    out = [text]
    for match in _LOCAL_INCLUDE.finditer(text):
        header = (src.parent / match.group(1).decode()).resolve()
        if header.parent != _SRC.resolve() or not header.is_file():
            raise RuntimeError(f"{src.name} includes {match.group(1).decode()!r}, which is not a header in {_SRC}")
        if header not in seen:
            seen.add(header)
            out.append(b"\0" + header.name.encode() + b"\0" + source_bytes(header, seen))
    return b"".join(out)


def _plan(name: str) -> tuple[str, Path, Path]:
    """(compiler, source csrc/<name>.cpp, cached library path) of kernel `name`; the library's
    name hashes the source and its csrc/ headers, the compiler's version, the flags and the CPU."""
    src = _SRC / f"{name}.cpp"
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (tried $CXX, g++, c++, clang++); install g++ "
                           "(Debian: apt-get install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = source_bytes(src) + "\0".join([version, " ".join(_FLAGS), _OPENMP, _cpu()]).encode()
    return cxx, src, cache_dir() / f"{name}-{hashlib.sha256(key).hexdigest()[:16]}.so"


def _build(name: str) -> ctypes.CDLL:
    """Compile csrc/<name>.cpp (or reuse the verified cached build) and load it; raises with the reason.

    A cached build whose checksum is missing or wrong, or which does not load or lacks a
    function of EXPORTS[name], is deleted and built again, once; a damaged one (not merely
    without a checksum) is reported in one RuntimeWarning that names the cache."""
    cxx, src, target = _plan(name)
    folder = target.parent
    _files.remove_stale_temps(folder, older_than_s=_STALE_S, also=_OLD_TEMP)
    damaged = None
    if target.exists():
        damaged = _damage(target)
        if damaged is None:
            try:
                return _open(name, target)
            except OSError as exc:  # a library that matches its checksum but does not load, or lacks a function
                damaged = f"it does not load: {exc}"
        _discard(target)
    before = "" if damaged is None else f"the cached build {target} was unusable ({damaged}) and "
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _compile(cxx, src, target)
    except OSError as exc:  # the cache folder cannot be written
        raise RuntimeError(f"{before}building {name} failed: {exc}; {_cache_note(folder)}") from None
    except RuntimeError as exc:  # the compiler failed
        if damaged is None:
            raise
        raise RuntimeError(f"{before}rebuilding it failed: {exc}; {_cache_note(folder)}") from None
    try:
        lib = _open(name, target)
    except OSError as exc:
        _discard(target)  # never keep a library that is known not to load
        raise RuntimeError(f"{before}the {name} kernel just built does not load ({exc}); "
                           f"{_cache_note(folder)}") from None
    if damaged is not None and damaged != _NO_CHECKSUM:  # expected after an upgrade: rebuilt quietly
        warnings.warn(f"qkv: the cached native {name} kernel {target} was unusable ({damaged}); rebuilt it "
                      f"(the kernel cache is set by QKV_KERNEL_CACHE)", RuntimeWarning, stacklevel=4)
    return lib


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


def amx_state(kernel: ctypes.CDLL, symbol: str, what: str) -> int:
    """Where a loaded FA-2 kernel's bfloat16 products run on AMX tiles (csrc/qkv_amx.h), from its export
    `symbol`: 2 on the processor's, 1 on a software model (a test build), 0 on none (no tiles in the build,
    or a build of a revision from before them, without the export); -1 and -2 on none because Linux refused
    the process the tile data (the warning names the errno, from `symbol`_errno) or the tiles failed the
    kernel's self-check, each said in a warning (`what` runs on the AVX512-BF16 dot product instead)."""
    fn = getattr(kernel, symbol, None)
    if fn is None:
        return 0
    fn.restype = ctypes.c_int
    state = int(fn())
    if state < 0:
        err = getattr(kernel, symbol + "_errno", None)
        code = int(err()) if err is not None else 0
        told = f": {errno.errorcode.get(code, code)}, {os.strerror(code)}" if code else ""
        hint = {errno.EINVAL: " (a Linux kernel before 5.16, or a CPU without the state)",
                errno.ENOSPC: " (a thread's alternate signal stack is too small for the larger signal frame)"}
        refused = f"Linux refused this process the AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM{told})"
        why = (refused + hint.get(code, "") if state == -1 else
               "the AMX tiles failed the kernel's self-check (they did not compute what csrc/qkv_amx.h models)")
        bug = ". This is a bug in qkv: please report it with your CPU's model name." if state == -2 else "."
        warnings.warn(f"qkv: {why}; {what} runs on the AVX512-BF16 dot product instead (correct, slower){bug}",
                      RuntimeWarning, stacklevel=3)
    return state


def warn_unavailable(name: str, what: str) -> None:
    """Warn once per kernel that `what` runs without its native kernel, and why; not where
    the user turned kernels off with QKV_NO_KERNELS (they asked for it)."""
    if name in _warned or _turned_off():
        return
    _warned.add(name)
    warnings.warn(f"qkv: the native {name} kernel is unavailable ({status(name)}); {what}",
                  RuntimeWarning, stacklevel=3)
