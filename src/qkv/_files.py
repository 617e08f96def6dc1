"""qkv's one way of writing a file: nothing that stands at the path is lost or replaced by accident.

Every file qkv writes (the JSON, HTML and PNG of `qkv explain` and `qkv bench`, the folders and
checkpoints of `qkv train`, the compiled kernels of `qkv.core._kernels`) goes through
`atomic_output`, or `write_bytes` / `write_text` built on it:

- The content goes to a temporary file next to the final target, ``.NAME.XXXXXXXX.tmp``, which
  is renamed over the target (`os.replace`) only when it is complete, so a reader sees the old
  file or the new one, never half of one.
- A symbolic link is followed: the temporary file is made beside the link's final target and
  renamed over that, so the link stays a link and its target gets the new content.
- A target that exists and is not a regular file (a directory, FIFO, socket or device) is
  refused, as is a missing folder or (for a user other than root) a read-only file: a
  `FileWriteError` names the path and what stands there. It is an `OSError`, which the CLI
  prints as one line and exits with status 2. Errors of the writing itself (disk full, no
  permission) come as `FileWriteError` too, naming the path.
- A new file gets the mode 0666 less the umask, like any file a program creates; a file that
  is replaced keeps its permission bits.
- The temporary file is removed on any exception, KeyboardInterrupt (Ctrl+C, SIGINT)
  included. SIGTERM and SIGHUP would kill the process with no cleanup at all, so while a write
  runs in the main thread and the signal has its default action, a handler turns it into
  `SystemExit(128 + signal number)`, which removes the temporary file on its way out; the
  previous handler is put back afterwards. Only SIGKILL (or a crash) can leave a temporary
  file behind; `remove_stale_temps` clears such files from a folder.

This module is a leaf: it imports nothing from qkv, so every layer (qkv.core included) may use
it without breaking the one-way flow models -> nn -> core.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import secrets
import signal
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["FileWriteError", "atomic_output", "check_target", "write_bytes", "write_text", "remove_stale_temps",
           "is_temp_name"]

PathLike = Union[str, "os.PathLike[str]"]

# .NAME.<8 hex digits>.tmp: hidden, and recognisable by `is_temp_name` for `remove_stale_temps`.
_TEMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
_NAME_MAX = 200  # of the NAME part: the whole temporary name stays under the usual 255-byte limit
# Signals whose default action ends the process without unwinding Python's stack.
_TERMINATING = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class FileWriteError(OSError):
    """A file cannot be written where asked; the message names the path and the reason.

    An OSError (with `errno` and `filename` set), so callers and the CLI that handle OSError
    handle this too; str() is the message alone."""

    def __init__(self, message: str, *, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno = errno
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0])


def is_temp_name(name: str) -> bool:
    """Whether a file name (no folder) is one of this module's temporary files."""
    return _TEMP.fullmatch(name) is not None


def _kind(mode: int) -> str:
    """What a non-regular file is, in words, from its st_mode."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def _where(shown: str, final: str) -> str:
    """The path as the user gave it, and where it leads when that is a link."""
    return f"'{shown}' (a link to '{final}')" if os.path.islink(shown) else f"'{shown}'"


def _resolve(path: PathLike, what: str) -> tuple[str, str, int | None]:
    """Check that `path` can be written as a regular file.

    Returns:
        (shown, final, mode): the path as given (str), the final target with every symbolic
        link resolved (str), and the permission bits of the existing target (None if new).

    Raises:
        FileWriteError: the target is not a regular file, its folder is missing, or it is a
            read-only file (for a user other than root).
    """
    shown = os.fspath(path)
    if not shown:
        raise FileWriteError(f"cannot write {what}: the path is empty", errno=_errno.ENOENT, filename=shown)
    final = os.path.realpath(shown)
    where = _where(shown, final)
    try:
        st = os.stat(final)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # a loop of links, a path through a file, no permission
        raise FileWriteError(f"cannot write {what} to {where}: {exc.strerror or exc}",
                             errno=exc.errno, filename=shown) from None
    if st is None:
        folder = os.path.dirname(final)
        if not os.path.isdir(folder):
            given = os.path.dirname(shown) if not os.path.islink(shown) else folder
            raise FileWriteError(f"cannot write {what} to {where}: the folder '{given or '.'}' does not exist",
                                 errno=_errno.ENOENT, filename=shown)
        return shown, final, None
    if not stat.S_ISREG(st.st_mode):
        hint = "give a file name" if stat.S_ISDIR(st.st_mode) else "give the path of a regular file"
        raise FileWriteError(f"cannot write {what} to {where}: it is {_kind(st.st_mode)}; {hint}",
                             errno=_errno.EISDIR if stat.S_ISDIR(st.st_mode) else _errno.EEXIST, filename=shown)
    if not os.access(final, os.W_OK):
        # Replacing works through the folder's permission, but a read-only file was made so on purpose.
        raise FileWriteError(f"cannot write {what} to {where}: the file is read-only; make it writable "
                             f"or choose another path", errno=_errno.EACCES, filename=shown)
    return shown, final, stat.S_IMODE(st.st_mode) & 0o777


def check_target(path: PathLike, *, what: str = "the file") -> Path:
    """Fail early (before costly work) where `path` cannot be written by `atomic_output`.

    Args:
        path: the file to be written (str or path-like); a symbolic link is followed.
        what: the file in words for the message, e.g. "HTML" or "the bench JSON".

    Returns:
        the final target (a Path, every link resolved).

    Raises:
        FileWriteError: as `atomic_output` would, before anything is written.
    """
    return Path(_resolve(path, what)[1])


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def _terminate_by_exception() -> Iterator[None]:
    """While the block runs: SIGTERM/SIGHUP raise SystemExit(128 + signum) instead of killing the
    process outright, so `finally` blocks run. Only in the main thread (the only one where
    Python may set handlers), and only for signals at their default action: a handler the
    program installed itself is left alone."""
    installed = []
    if threading.current_thread() is threading.main_thread():
        for sig in _TERMINATING:
            try:
                if signal.getsignal(sig) is signal.SIG_DFL:
                    signal.signal(sig, _raise_exit)
                    installed.append(sig)
            except (ValueError, OSError):  # not the main interpreter, or a signal Python cannot set
                pass
    try:
        yield
    finally:
        for sig in installed:
            signal.signal(sig, signal.SIG_DFL)


def _temp_beside(final: str) -> str:
    """Create an empty temporary file in final's folder and return its path. Created by
    os.open with mode 0666, so the umask applies as to any new file (mkstemp would give 0600)."""
    folder, name = os.path.split(final)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name[:_NAME_MAX]}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(_errno.EEXIST, "no free temporary name", folder)


def _remove(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _failed(exc: OSError, what: str, where: str, shown: str) -> FileWriteError:
    error = FileWriteError(f"cannot write {what} to {where}: {exc.strerror or exc}", errno=exc.errno, filename=shown)
    error.__cause__ = exc
    return error


@contextmanager
def atomic_output(path: PathLike, *, what: str = "the file") -> Iterator[Path]:
    """Write a file whole or not at all: the block writes a temporary file, which then replaces `path`.

    For producers that write a file themselves (a compiler, `savefig`):

        with atomic_output("out.png", what="the PNG") as tmp:
            fig.savefig(tmp)

    Args:
        path: the file to write (str or path-like). A symbolic link is followed (the link stays);
            an existing target must be a regular file.
        what: the file in words, for error messages ("HTML", "the checkpoint").

    Yields:
        the temporary file (a Path, empty, beside the final target) for the block to fill.
        When the block ends normally it replaces the target; when it raises (KeyboardInterrupt
        and, in the main thread, SIGTERM/SIGHUP included) it is removed and the target is
        untouched.

    Raises:
        FileWriteError: the target is refused (see the module docstring) or writing fails; an
            exception of the block itself passes through unchanged.
    """
    shown, final, _ = _resolve(path, what)
    where = _where(shown, final)
    with _terminate_by_exception():
        tmp = None
        try:
            try:
                tmp = _temp_beside(final)
            except OSError as exc:
                raise _failed(exc, what, where, shown) from None
            yield Path(tmp)
            # Checked again: something else may have been put at the path meanwhile.
            _, final, mode = _resolve(path, what)
            try:
                if mode is not None:
                    os.chmod(tmp, mode)  # a replaced file keeps its permission bits
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)  # on disk before the rename: a crash leaves the old file or the new one
                finally:
                    os.close(fd)
                os.replace(tmp, final)
            except OSError as exc:
                raise _failed(exc, what, where, shown) from None
            tmp = None
        finally:
            _remove(tmp)


def write_bytes(path: PathLike, data: bytes, *, what: str = "the file") -> None:
    """Write `data` (bytes) to `path` whole or not at all (see `atomic_output`)."""
    with atomic_output(path, what=what) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as exc:
            shown = os.fspath(path)
            raise _failed(exc, what, _where(shown, os.path.realpath(shown)), shown) from None


def write_text(path: PathLike, text: str, *, what: str = "the file", encoding: str = "utf-8") -> None:
    """Write `text` (str, encoded with `encoding`) to `path` whole or not at all (see `atomic_output`)."""
    write_bytes(path, text.encode(encoding), what=what)


def remove_stale_temps(folder: PathLike, *, older_than_s: float, also: re.Pattern | None = None) -> list[Path]:
    """Remove this module's temporary files in `folder` last modified more than `older_than_s`
    seconds ago: the leftovers of a process killed (SIGKILL, a crash) in the middle of a write.
    Younger ones may belong to a write still running in another process and are kept.

    Args:
        folder: the folder to clean (str or path-like); only its own entries, not subfolders.
        older_than_s: the age in seconds above which a temporary file is a leftover.
        also: a compiled pattern of further names (whole name) to treat the same way: the
            temporary files of an older writer.

    Returns:
        the files removed (a missing folder has none).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    limit = time.time() - older_than_s
    for entry in entries:
        try:
            ours = is_temp_name(entry.name) or (also is not None and also.fullmatch(entry.name) is not None)
            if ours and entry.is_file(follow_symlinks=False) \
                    and entry.stat(follow_symlinks=False).st_mtime < limit:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:  # removed by another process meanwhile
            pass
    return removed
