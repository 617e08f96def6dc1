"""qkv._files, the one writer of every file qkv writes: whole or not at all, through symbolic
links, never over a directory, FIFO, socket or device, with the umask's mode, and no temporary
file left behind after an exception, Ctrl+C (SIGINT) or SIGTERM. The writers of each command
are tested in their own files (test_html, test_png, test_bench, test_trained_training,
test_kernels); the signal tests here go through the public writers, in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qkv import _files
from qkv._files import FileWriteError, atomic_output, check_target, write_bytes, write_text

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _leftovers(*folders: Path) -> list[str]:
    return [p.name for f in folders for p in f.iterdir() if p.name.endswith(".tmp")]


def _special(kind: str, path: Path) -> None:
    """Make a FIFO, socket, character device or directory at `path` (skip where not permitted)."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        if len(str(path)) > 100:
            pytest.skip("the temporary path is too long for a Unix socket")
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
        except (PermissionError, OSError) as exc:
            pytest.skip(f"cannot make a device node here: {exc}")
    else:
        path.mkdir()


KINDS = {"fifo": (stat.S_ISFIFO, "a FIFO"), "socket": (stat.S_ISSOCK, "a socket"),
         "device": (stat.S_ISCHR, "a character device"), "directory": (stat.S_ISDIR, "a directory")}


def test_writes_whole_files_with_the_umask_mode(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "été\n", what="the text")
    assert target.read_text(encoding="utf-8") == "été\n"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    write_bytes(target, b"\x00\x01", what="the bytes")
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_a_replaced_file_keeps_its_permission_bits(tmp_path):
    target = tmp_path / "private.json"
    target.write_text("old")
    target.chmod(0o600)
    write_text(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = elsewhere / "real.html"
    real.write_text("old")
    link = tmp_path / "link.html"
    link.symlink_to(real)
    write_text(link, "new", what="HTML")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new"
    # A dangling link gets its target created, as a shell redirection would.
    dangling = tmp_path / "dangling.html"
    dangling.symlink_to(elsewhere / "new.html")
    write_text(dangling, "made")
    assert dangling.is_symlink() and (elsewhere / "new.html").read_text() == "made"
    assert _leftovers(tmp_path, elsewhere) == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_target_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    target = tmp_path / "out.json"
    _special(kind, target)
    is_kind, words = KINDS[kind]
    with pytest.raises(FileWriteError, match=f"cannot write the JSON to '{target}': it is {words}"):
        write_text(target, "{}", what="the JSON")
    with pytest.raises(OSError, match=words):  # the CLI turns OSError into status 2
        check_target(target, what="the JSON")
    assert is_kind(os.lstat(target).st_mode), "the special file was replaced"
    # Through a link too: the link is not replaced either.
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(FileWriteError, match=f"'{link}' \\(a link to '{target}'\\): it is {words}"):
        write_text(link, "{}", what="the JSON")
    assert link.is_symlink() and is_kind(os.lstat(target).st_mode)
    assert _leftovers(tmp_path) == []


def test_missing_folder_and_link_loop_are_refused_clearly(tmp_path):
    with pytest.raises(FileWriteError, match=f"the folder '{tmp_path / 'no'}' does not exist") as info:
        write_text(tmp_path / "no" / "x.json", "{}")
    assert info.value.filename == str(tmp_path / "no" / "x.json")
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    with pytest.raises(FileWriteError, match="symbolic links"):
        write_text(loop, "{}")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anything")
def test_a_read_only_file_is_refused(tmp_path):
    target = tmp_path / "kept.json"
    target.write_text("mine")
    target.chmod(0o444)
    with pytest.raises(FileWriteError, match="read-only"):
        write_text(target, "{}")
    assert target.read_text() == "mine"


def test_an_exception_in_the_block_removes_the_temporary_file(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    for exc in (ValueError("drawing failed"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_output(target, what="the PNG") as tmp:
                assert tmp.parent == tmp_path and _files.is_temp_name(tmp.name)
                tmp.write_bytes(b"half")
                raise exc
        assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_sigterm_handler_is_set_only_during_a_write_in_the_main_thread(tmp_path):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test process handles SIGTERM itself")
    seen = {}
    with atomic_output(tmp_path / "a", what="a") as tmp:
        seen["main"] = signal.getsignal(signal.SIGTERM)
        tmp.write_text("x")
    assert seen["main"] is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the previous handler is put back"

    def in_thread():
        with atomic_output(tmp_path / "b", what="b") as tmp:
            seen["thread"] = signal.getsignal(signal.SIGTERM)
            tmp.write_text("y")

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen["thread"] is signal.SIG_DFL and (tmp_path / "b").read_text() == "y"


def test_stale_temporary_files_are_removed_young_ones_kept(tmp_path):
    old = tmp_path / ".x.json.0123abcd.tmp"
    young = tmp_path / ".y.json.89abcdef.tmp"
    other = tmp_path / "notes.tmp"
    for p in (old, young, other):
        p.write_text("x")
    os.utime(old, (1, 1))
    os.utime(other, (1, 1))
    assert _files.remove_stale_temps(tmp_path, older_than_s=600) == [old]
    assert not old.exists() and young.exists() and other.exists()
    assert _files.remove_stale_temps(tmp_path / "missing", older_than_s=0) == []


# A write that stops just before its rename (os.replace sleeps), so that a signal lands while
# the temporary file is complete and the old file is still in place.
_SLOW = """
import os, sys, time
sys.path.insert(0, {src!r})
real = os.replace
def slow(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(120)
    real(*args, **kwargs)
os.replace = slow
target = {target!r}
kind = {kind!r}
if kind == "html":
    from qkv.inspect.html import write_html
    sys.path.insert(0, {tests_inspect!r})
    from synthetic_explain import make_data
    write_html(make_data(), target)
elif kind == "bench":
    from types import SimpleNamespace
    from qkv import bench
    bench.write_json(SimpleNamespace(to_dict=lambda: {{"rows": [1] * 100000}}), target)
else:
    from pathlib import Path
    import torch
    from qkv.train import _loop
    out = Path(target).parent
    _loop.save_tensors(Path(target), {{"w": torch.zeros(1000, 1000)}})
print("finished", flush=True)
"""


@pytest.mark.parametrize("writer", ["html", "bench", "checkpoint"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_write_leaves_the_old_file_and_no_temporary(tmp_path, writer, sig):
    """The process is signalled while the new file is complete but not yet renamed: the old
    file stays, whole, and the temporary file is gone (SIGTERM used to leave it)."""
    target = tmp_path / {"html": "page.html", "bench": "b.json", "checkpoint": "checkpoint.safetensors"}[writer]
    target.write_bytes(b"the old file")
    code = _SLOW.format(src=SRC, tests_inspect=str(Path(__file__).parent / "inspect"), target=str(target), kind=writer)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "ready\n", line + proc.stderr.read()
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the write has its temporary file"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "finished" not in out
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    assert target.read_bytes() == b"the old file"
    assert _leftovers(tmp_path) == [], f"a temporary file was left behind after {sig.name}"
