"""The native-kernel loader (qkv.core._kernels): the build is cached under a name that hashes
source, compiler and flags, written atomically, reports a failing compiler, can be turned off
with QKV_NO_KERNELS, and a missing kernel makes the decode backend warn once and compute the
same on its eager path. (The kernel's numbers are checked in test_decode.)
"""

from __future__ import annotations

import warnings

import pytest
import torch

import qkv
from qkv.core import _kernels, decode
from test_decode import _inputs


def test_a_missing_kernel_warns_once_and_runs_eager(monkeypatch, recwarn):
    """Without the kernel the backend says so, once, and computes the same on its eager path."""
    monkeypatch.delenv("QKV_NO_KERNELS", raising=False)
    monkeypatch.setattr(_kernels, "_loaded", {"decode_kernel": None})
    monkeypatch.setattr(_kernels, "_why", {"decode_kernel": "no C++ compiler found (test)"})
    monkeypatch.setattr(_kernels, "_warned", set())
    monkeypatch.setattr(decode, "_kernel_lib", lambda: _kernels.load("decode_kernel"))
    (q, k, v), _ = _inputs(1, 4, 2, 1, 40, torch.float32, seed=14)
    with pytest.warns(RuntimeWarning, match=r"native decode_kernel kernel is unavailable \(no C\+\+ compiler found \(test\)\)"):
        first = qkv.attention(q, k, v, backend="decode")
    qkv.attention(q, k, v, backend="decode")
    assert not [w for w in recwarn if "decode_kernel" in str(w.message)], "the warning comes once"
    torch.testing.assert_close(first, qkv.reference_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_kernel_build_is_cached_atomic_and_reports_failures(tmp_path, monkeypatch):
    if _kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.setenv("QKV_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = _kernels._build("decode_kernel")
    assert lib.qkv_decode_version() == 3
    built = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].startswith("decode_kernel-") and built[0].endswith(".so"), built
    stamp = (tmp_path / "cache" / built[0]).stat().st_mtime_ns
    _kernels._build("decode_kernel")  # found in the cache, not rebuilt
    assert (tmp_path / "cache" / built[0]).stat().st_mtime_ns == stamp
    # A compiler that fails: the reason is reported and no partial library is left behind.
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("QKV_KERNEL_CACHE", str(tmp_path / "broken"))
    with pytest.raises(RuntimeError, match="false failed on decode_kernel.cpp"):
        _kernels._build("decode_kernel")
    assert list((tmp_path / "broken").iterdir()) == []
    # Turned off by the environment.
    monkeypatch.setenv("QKV_NO_KERNELS", "1")
    monkeypatch.setattr(_kernels, "_loaded", {})
    assert _kernels.load("decode_kernel") is None
    assert _kernels.status("decode_kernel") == "turned off by QKV_NO_KERNELS"
    monkeypatch.setattr(_kernels, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        _kernels.warn_unavailable("decode_kernel", "eager")


def test_auto_looks_for_the_kernel_only_where_it_changes_the_answer(monkeypatch):
    """An encoder's short sentence (Lq = Lk <= 16) never builds the decode kernel; a decode
    step against a large cache does look it up."""
    from qkv.core import choose_backend
    from qkv.core._spec import build_spec

    looked = []
    monkeypatch.setattr(decode, "_kernel_lib", lambda: looked.append(1))  # and returns None
    short = torch.zeros(1, 4, 8, 16)
    choose_backend(build_spec(short, short, short), short, False)
    assert not looked, "short self-attention must not compile the decode kernel"
    one, cache = torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 65536, 16)  # 32 MiB of float32 keys and values
    assert choose_backend(build_spec(one, cache, cache), one, False) == "decode"  # by length, without the kernel
    assert looked
