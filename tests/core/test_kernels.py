"""The native-kernel loader (qkv.core._kernels): the build is cached under a name that hashes
source, compiler and flags, written atomically, reports a failing compiler, can be turned off
with QKV_NO_KERNELS, and a missing kernel makes the decode backend warn once and compute the
same on its eager path. A damaged cache (a truncated library, one without the kernel's
functions, a wrong or missing checksum) is never loaded as it is: it is rebuilt once, and if
that fails the eager path runs with one warning naming QKV_KERNEL_CACHE; a build killed midway
leaves no file. (The kernel's numbers are checked in test_decode.)

Most of these tests build a stub csrc/decode_kernel.cpp (fast to compile) into a private
QKV_KERNEL_CACHE; the two that damage a real build do so in a subprocess, since loading a
truncated library can kill the process with SIGBUS.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from random_qkv import random_qkv as _inputs

import qkv
from qkv.core import _kernels
from qkv.core.engines import decode_native


def test_a_missing_kernel_warns_once_and_runs_eager(monkeypatch, recwarn):
    """Without the kernel the backend says so, once, and computes the same on its eager path."""
    monkeypatch.delenv("QKV_NO_KERNELS", raising=False)
    monkeypatch.setattr(_kernels, "_loaded", {"decode_kernel": None})
    monkeypatch.setattr(_kernels, "_why", {"decode_kernel": "no C++ compiler found (test)"})
    monkeypatch.setattr(_kernels, "_warned", set())
    monkeypatch.setattr(decode_native, "lib", lambda: _kernels.load("decode_kernel"))
    (q, k, v), _ = _inputs(1, 4, 2, 1, 40, torch.float32, seed=14)
    with pytest.warns(RuntimeWarning,
                      match=r"native decode_kernel kernel is unavailable \(no C\+\+ compiler found \(test\)\)"):
        first = qkv.attention(q, k, v, backend="decode")
    qkv.attention(q, k, v, backend="decode")
    assert not [w for w in recwarn if "decode_kernel" in str(w.message)], "the warning comes once"
    torch.testing.assert_close(first, qkv.reference_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_kernel_build_is_cached_atomic_and_reports_failures(tmp_path, monkeypatch):
    if _kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.setenv("QKV_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = _kernels._build("decode_kernel")
    assert lib.qkv_decode_version() == decode_native.VERSION
    built = sorted(p.name for p in (tmp_path / "cache").iterdir())
    # the library and, written after it, its checksum (sha256sum's format)
    assert len(built) == 2 and built[0].startswith("decode_kernel-") and built[0].endswith(".so"), built
    assert built[1] == built[0] + ".sha256"
    assert (tmp_path / "cache" / built[1]).read_text().split() == [_kernels._sha256(tmp_path / "cache" / built[0]),
                                                                    built[0]]
    built = built[:1]
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
    from qkv.core.spec import build_spec

    looked = []
    monkeypatch.setattr(decode_native, "lib", lambda: looked.append(1))  # and returns None
    short = torch.zeros(1, 4, 8, 16)
    choose_backend(build_spec(short, short, short), short, False)
    assert not looked, "short self-attention must not compile the decode kernel"
    one, cache = torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 65536, 16)  # 32 MiB of float32 keys and values
    assert choose_backend(build_spec(one, cache, cache), one, False) == "decode"  # by length, without the kernel
    assert looked


SRC = str(Path(__file__).resolve().parents[2] / "src")
# A stand-in for csrc/decode_kernel.cpp that exports the functions (never called here).
STUB = """extern "C" {
int qkv_decode() { return -1; }
int qkv_decode_partials() { return -1; }
int qkv_decode_version() { return 2; }
int qkv_decode_has_bf16_dot() { return 0; }
int qkv_decode_vector_width() { return 16; }
int qkv_decode_has_fma() { return 1; }
}
"""
OTHER = 'extern "C" int something_else() { return 1; }\n'  # a library without the kernel's functions


def _script(path: Path, body: str) -> str:
    """An executable shell script standing in for the compiler: it reports the real compiler's
    version (so the cache name is the same) and then runs `body`."""
    path.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then exec {_kernels._compiler()} --version; fi\n{body}\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private QKV_KERNEL_CACHE, fresh module caches, the stub source, and a count of builds.
    Every library the loader opens is checked to match its checksum first."""
    if _kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.delenv("QKV_NO_KERNELS", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("QKV_KERNEL_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "decode_kernel.cpp").write_text(STUB)
    monkeypatch.setattr(_kernels, "_SRC", src)
    monkeypatch.setattr(_kernels, "_loaded", {})
    monkeypatch.setattr(_kernels, "_why", {})
    monkeypatch.setattr(_kernels, "_warned", set())
    builds, opened = [], []
    compile_, open_ = _kernels._compile, _kernels._open

    def counting(cxx, source, target):
        builds.append(target.name)
        compile_(cxx, source, target)

    def checked(name, lib):
        assert _kernels._damage(lib) is None, f"{lib.name} is opened without a matching checksum"
        opened.append(lib.name)
        return open_(name, lib)

    monkeypatch.setattr(_kernels, "_compile", counting)
    monkeypatch.setattr(_kernels, "_open", checked)

    def seed():
        """Build the stub into the cache without loading it; returns the library's path."""
        cxx, source, target = _kernels._plan("decode_kernel")
        target.parent.mkdir(parents=True, exist_ok=True)
        compile_(cxx, source, target)
        return target

    return SimpleNamespace(folder=tmp_path / "cache", src=src, builds=builds, opened=opened, seed=seed, tmp=tmp_path)


def _files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_truncated_cached_build_is_rebuilt_once_never_loaded(cache):
    lib_path = cache.seed()
    data = lib_path.read_bytes()
    lib_path.write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match=r"unusable \(its checksum does not match.*QKV_KERNEL_CACHE") as caught:
        lib = _kernels.load("decode_kernel")
    assert len(caught) == 1
    assert lib is not None and lib.qkv_decode_version() == 2
    assert cache.builds == [lib_path.name] and cache.opened == [lib_path.name]
    assert _files_in(cache.folder) == [lib_path.name, lib_path.name + ".sha256"]
    assert _kernels._damage(lib_path) is None
    assert _kernels.load("decode_kernel") is lib and len(cache.builds) == 1  # once per process


def test_a_cached_build_without_checksum_is_rebuilt_quietly(cache):
    """A build cut short before its checksum, or made by an older qkv: rebuilt, no warning."""
    lib_path = cache.seed()
    (cache.folder / (lib_path.name + ".sha256")).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _kernels.load("decode_kernel") is not None
    assert cache.builds == [lib_path.name]
    assert _kernels._damage(lib_path) is None


def test_a_checksum_that_does_not_match_is_a_rebuild(cache):
    lib_path = cache.seed()
    (cache.folder / (lib_path.name + ".sha256")).write_text("0" * 64 + "  " + lib_path.name + "\n")
    with pytest.warns(RuntimeWarning, match="checksum does not match"):
        assert _kernels.load("decode_kernel") is not None
    assert cache.builds == [lib_path.name]


def test_a_cached_library_without_the_kernel_functions_is_rebuilt(cache):
    """A library of the right name and checksum that lacks the functions (it used to fail with
    AttributeError on every call): unloaded, deleted, built again."""
    lib_path = cache.seed()
    other = cache.tmp / "other.cpp"
    other.write_text(OTHER)
    subprocess.run([_kernels._compiler(), "-shared", "-fPIC", "-o", str(lib_path), str(other)], check=True)
    (cache.folder / (lib_path.name + ".sha256")).write_text(f"{_kernels._sha256(lib_path)}  {lib_path.name}\n")
    with pytest.warns(RuntimeWarning, match="lacks qkv_decode, qkv_decode_partials, qkv_decode_has_bf16_dot, "
                                               "qkv_decode_version, qkv_decode_vector_width, qkv_decode_has_fma"):
        lib = _kernels.load("decode_kernel")
    assert lib is not None and lib.qkv_decode_version() == 2
    assert cache.builds == [lib_path.name] and cache.opened == [lib_path.name, lib_path.name]


def test_a_failing_rebuild_falls_back_to_eager_with_one_warning(cache, monkeypatch, recwarn):
    lib_path = cache.seed()
    lib_path.write_bytes(lib_path.read_bytes()[:1000])
    monkeypatch.setenv("CXX", _script(cache.tmp / "cxx", 'echo "cc1plus: out of memory" >&2; exit 1'))
    monkeypatch.setattr(decode_native, "_typed", set())
    (q, k, v), _ = _inputs(1, 4, 2, 1, 40, torch.float32, seed=15)
    with pytest.warns(RuntimeWarning, match=r"native decode_kernel kernel is unavailable \(the cached build .* was "
                      r"unusable \(its checksum does not match .*\) and rebuilding it failed: cxx failed on "
                      r"decode_kernel.cpp: cc1plus: out of memory; the kernel cache is .*, set by QKV_KERNEL_CACHE"
                      ) as caught:
        first = qkv.attention(q, k, v, backend="decode")
    assert len([w for w in caught if "decode_kernel" in str(w.message)]) == 1
    second = qkv.attention(q, k, v, backend="decode")
    assert not [w for w in recwarn if "decode_kernel" in str(w.message)], "the warning comes once"
    torch.testing.assert_close(first, qkv.reference_attention(q, k, v), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, first)
    assert cache.builds == [lib_path.name] and cache.opened == []
    assert _files_in(cache.folder) == [], "the damaged build is deleted and the failed one leaves nothing"


def test_a_fresh_build_without_the_functions_is_not_kept(cache):
    (cache.src / "decode_kernel.cpp").write_text(OTHER)
    assert _kernels.load("decode_kernel") is None
    assert "lacks qkv_decode, qkv_decode_partials" in _kernels.status("decode_kernel")
    assert "QKV_KERNEL_CACHE" in _kernels.status("decode_kernel")
    assert len(cache.builds) == 1 and _files_in(cache.folder) == []


def test_leftovers_of_killed_builds_are_removed_when_old(cache):
    cache.folder.mkdir()
    old = [cache.folder / ".decode_kernel-0123456789abcdef.so.0badc0de.tmp",  # qkv._files' temporary name
           cache.folder / ".decode_kernel-ab12cd34.so"]  # tempfile.mkstemp's, of qkv before it
    young = cache.folder / ".decode_kernel-0123456789abcdef.so.12345678.tmp"  # a build running elsewhere
    for p in old + [young]:
        p.write_bytes(b"\x7fELF half")
    for p in old:
        os.utime(p, (1, 1))
    assert _kernels.load("decode_kernel") is not None
    names = _files_in(cache.folder)
    assert young.name in names and not any(p.name in names for p in old)


def test_a_build_terminated_midway_leaves_no_file(tmp_path):
    """SIGTERM while the compiler runs: the process ends (status 143) and removes the partial build."""
    if _kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    flag, folder = tmp_path / "compiling", tmp_path / "cache"
    cxx = _script(tmp_path / "slow-cxx", f"touch {flag}\nexec sleep 120")
    code = (f"import sys; sys.path.insert(0, {SRC!r})\n"
            "from qkv.core import _kernels\n"
            "_kernels._build('decode_kernel')\n")
    env = {**os.environ, "CXX": cxx, "QKV_KERNEL_CACHE": str(folder)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        while not flag.exists():  # the compiler has started
            assert proc.poll() is None, proc.communicate()[1]
            try:
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert _files_in(folder) == [], "a partial build was left in the cache"


# ---------------------------------------------------------------- the real kernel, damaged
_DECODE = """
import sys, warnings
sys.path.insert(0, {src!r})
import torch, qkv
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, n, 32, generator=g) for n in (1, 300, 300))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = [qkv.attention(q, k, v, backend="decode") for _ in range(2)]
torch.testing.assert_close(outs[0], qkv.reference_attention(q, k, v), rtol=1e-5, atol=1e-6)
from qkv.core import _kernels
print("ok", _kernels.status("decode_kernel"), len([w for w in caught if "decode_kernel" in str(w.message)]))
for w in caught:
    print(w.message)
"""


@pytest.fixture(scope="module")
def real_build(tmp_path_factory):
    """A cache holding the real decode kernel, built in a subprocess (never loaded here)."""
    if _kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    folder = tmp_path_factory.mktemp("kernels") / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("QKV_NO_KERNELS", "CXX")}
    code = f"import sys; sys.path.insert(0, {SRC!r})\nfrom qkv.core import _kernels\n_kernels._build('decode_kernel')\n"
    subprocess.run([sys.executable, "-c", code], env={**env, "QKV_KERNEL_CACHE": str(folder)}, check=True, timeout=600)
    return folder, env


def _decode_in_subprocess(folder: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _DECODE.format(src=SRC)], env={**env, "QKV_KERNEL_CACHE": str(folder)},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("damage", ["truncated", "without the functions"])
def test_decode_survives_a_damaged_real_build(real_build, tmp_path, damage):
    """A truncated library in the cache killed every decode call with SIGBUS, and a library
    without the kernel's functions raised AttributeError on every call; now the build is
    replaced once, with one warning, and decoding gives the right answer."""
    seeded, env = real_build
    folder = tmp_path / "cache"
    shutil.copytree(seeded, folder)
    lib_path = next(folder.glob("decode_kernel-*.so"))
    if damage == "truncated":
        lib_path.write_bytes(lib_path.read_bytes()[: lib_path.stat().st_size // 2])
    else:
        other = tmp_path / "other.cpp"
        other.write_text(OTHER)
        subprocess.run([_kernels._compiler(), "-shared", "-fPIC", "-o", str(lib_path), str(other)], check=True)
        digest = hashlib.sha256(lib_path.read_bytes()).hexdigest()
        (folder / (lib_path.name + ".sha256")).write_text(f"{digest}  {lib_path.name}\n")
    run = _decode_in_subprocess(folder, env)
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    assert run.stdout.startswith("ok compiled 1\n"), run.stdout
    assert "QKV_KERNEL_CACHE" in run.stdout


def test_a_header_change_rebuilds_the_kernel(cache):
    """A kernel that includes a csrc/ header is named by the header's bytes too: editing the header
    builds a new library rather than loading the old one."""
    (cache.src / "qkv_common.h").write_text("#pragma once\nconstexpr int qkv_answer = 1;\n")
    (cache.src / "decode_kernel.cpp").write_text('#include "qkv_common.h"\n' + STUB)
    first = _kernels._plan("decode_kernel")[2]
    assert _kernels.load("decode_kernel") is not None and cache.builds == [first.name]
    (cache.src / "qkv_common.h").write_text("#pragma once\nconstexpr int qkv_answer = 2;\n")
    second = _kernels._plan("decode_kernel")[2]
    assert second != first
    _kernels._loaded.clear()
    assert _kernels.load("decode_kernel") is not None and cache.builds == [first.name, second.name]


def test_an_include_outside_csrc_is_refused_by_name(cache):
    (cache.src / "decode_kernel.cpp").write_text('#include "../elsewhere.h"\n' + STUB)
    (cache.tmp / "elsewhere.h").write_text("#pragma once\n")
    assert _kernels.load("decode_kernel") is None
    assert "includes '../elsewhere.h', which is not a header in" in _kernels.status("decode_kernel")


@pytest.mark.parametrize("state, code, words", [
    (2, 0, None), (1, 0, None), (0, 0, None),
    (-1, errno.ENOSPC, "ENOSPC.*signal stack is too small"),
    (-1, errno.EINVAL, "EINVAL.*before 5.16"),
    (-2, 0, "failed the kernel's self-check.*bug in qkv"),
])
def test_amx_state_names_why_the_tiles_do_not_run(state, code, words):
    """_kernels.amx_state reads a kernel's AMX exports (csrc/qkv_amx.h): the state as it is, and for the
    states where the tiles do not run, one warning naming why (Linux's errno, or the self-check)."""
    kernel = SimpleNamespace(qkv_flash_amx=lambda: state, qkv_flash_amx_errno=lambda: code)
    if words is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _kernels.amx_state(kernel, "qkv_flash_amx", "the forward") == state
    else:
        with pytest.warns(RuntimeWarning, match=words):
            assert _kernels.amx_state(kernel, "qkv_flash_amx", "the forward") == state
    assert _kernels.amx_state(SimpleNamespace(), "qkv_flash_amx", "the forward") == 0  # a build from before the tiles
