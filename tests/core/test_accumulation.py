"""Long float32 sums in the native kernels: P V over many keys.

The forward FA-2 kernel (csrc/flash_fwd_kernel.cpp) and the decode kernel (csrc/decode_kernel.cpp)
summed P V in one running sum over every key; the reference's matrix product (MKL) sums in blocks.
With values sharing a large offset that missed the tolerance rule (found by a fuzz campaign:
docs/benchmarks.md, "The native kernels, seventh part"). Each block of keys is now summed from zero
and added once.
"""

from __future__ import annotations

import pytest

from native_checks import check_accumulation
from qkv.core import _kernels
from qkv.core.engines import decode_native, native_flash


def test_native_forward_sums_in_blocks():
    if native_flash.lib() is None:
        pytest.skip(f"the native flash kernel is unavailable here: {_kernels.status('flash_fwd_kernel')}")
    check_accumulation("native")


def test_decode_kernel_sums_in_blocks(monkeypatch):
    if decode_native.lib() is None:
        pytest.skip(f"the decode kernel is unavailable here: {_kernels.status('decode_kernel')}")
    calls = []
    forward = decode_native.forward
    monkeypatch.setattr(decode_native, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    check_accumulation("decode", backend="decode")
    assert calls, "the decode backend must have run its native kernel"
