"""Private files for authentication data: 0600, owned by us, replaced atomically.

The built-in user directory and the file secret store both keep their data in one
small file. Three rules hold for both, so they live here once:

* a file (or directory) that others could read or write is refused with an error
  that names the path, its mode and the fix, instead of being used;
* writes go to a temporary file in the same directory, are fsynced, then renamed
  over the old file: a reader sees the old or the new content, never half of it;
* writers in different processes (the gateway and the admin CLI) serialise on an
  ``flock`` of a sidecar ``.lock`` file, so no update is lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


class PrivateFileError(Exception):
    """A file that holds secrets has unsafe permissions, a wrong owner or is unreadable."""


def _check_stat(path: Path, st: os.stat_result, *, directory: bool) -> None:
    kind = "directory" if directory else "file"
    if directory and not stat.S_ISDIR(st.st_mode):
        raise PrivateFileError(f"{path} must be a directory")
    if not directory and not stat.S_ISREG(st.st_mode):
        raise PrivateFileError(f"{path} must be a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        wanted = "700" if directory else "600"
        raise PrivateFileError(
            f"{path} has mode {mode:04o}: a {kind} that holds secrets must not be accessible to "
            f"group or others; run 'chmod {wanted} {path}'"
        )
    if st.st_uid != os.geteuid():
        raise PrivateFileError(
            f"{path} is owned by uid {st.st_uid}, not by this process (uid {os.geteuid()}); "
            f"refusing to trust it"
        )


def check_private_dir(path: Path) -> None:
    """Raise PrivateFileError unless ``path`` is a directory only we can use."""
    _check_stat(path, os.stat(path), directory=True)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) if needed. An existing directory keeps its mode:
    parents such as /var/lib are shared, only the file inside must be private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def read_private(path: Path) -> bytes | None:
    """The content of ``path``, or None if it does not exist.

    The mode is checked on the open descriptor, not the name, so a file swapped in
    between the check and the read cannot slip through; symlinks are refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise PrivateFileError(f"{path} is a symbolic link; refusing to follow it") from None
        raise PrivateFileError(f"cannot open {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        _check_stat(path, os.fstat(f.fileno()), directory=False)
        return f.read()


def file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime_ns) of ``path``: changes whenever a writer renames a new
    version in, so readers know when to reload. None if the file does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file (0600) in the same directory, fsync,
    rename, fsync the directory. On any error the old file is untouched and the temp
    file is removed."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp already creates 0600; fchmod guards against an unusual umask handling.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (created 0600) for a read-modify-write."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
