"""A pytest plugin: the suite's native kernels built on the processor's AMX path (QKV_AMX 2,
src/qkv/core/csrc/qkv_amx.h) against this folder's stand-ins for GCC's AMX headers, with per-thread
tiles emulated in asm, so a CPU with AVX512-BF16 and no AMX runs the tests on the code an AMX CPU
would run, as GCC compiles it. Every kernel qkv builds (and `qkv.bench.kernels.build_for(name,
"native")`) gets the flags below, in a kernel cache of its own. GCC only. Run:

    GLIBC_TUNABLES=glibc.rtld.optional_static_tls=262144 PYTHONPATH=tests/core/amx_fake \\
        .venv/bin/python -m pytest -q -n 2 -p stand_in_plugin tests/core

(the tunable: the stand-ins' thread-local tiles use the initial-exec TLS model, which a library loaded
with dlopen may only use from glibc's spare static TLS). Not part of `make test`: the suite runs the
processor's path on the global stand-in tiles in tests/core/test_native_flash_amx.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FLAGS = ["-mamx-tile", "-mamx-bf16", f"-I{Path(__file__).resolve().parent}", "-DQKV_AMX_FAKE_TILES",
         "-DQKV_FAKE_TILES_PER_THREAD"]


def pytest_configure(config):
    os.environ["QKV_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="qkv-stand-in-kernels-")
    from qkv.core import _kernels

    _kernels._FLAGS.extend(f for f in FLAGS if f not in _kernels._FLAGS)
