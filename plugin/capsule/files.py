"""Files that hold secrets: private (0600) and atomic writes, the profile lock, no litter."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in a 0600 file: a temp file in the same directory, fsync,
    rename, fsync of the directory. A crash leaves the old content or the new, never a mix."""
    directory = path.parent.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileLock:
    """An exclusive advisory lock (flock) on ``<path>.lock``: one writer of a file at a time.

    Whoever writes ``path`` (and its companions) holds it, so temp files left beside ``path``
    while nobody holds it are litter of a killed writer.
    """

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock without waiting; False if another open file holds it."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        remove_litter(self.path.with_name(self.path.name.removesuffix(".lock")))
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_litter(path: Path) -> list[Path]:
    """Delete the temp files of killed :func:`write_private` calls for ``path`` and its
    companions (``.<name>.XXXXXXXX``); call only while holding ``path``'s FileLock."""
    removed = []
    prefix = f".{path.name}."
    for candidate in path.parent.iterdir():
        if candidate.name.startswith(prefix) and candidate.is_file() and not candidate.is_symlink():
            with contextlib.suppress(OSError):  # gone already, or a read-only disk
                candidate.unlink()
                removed.append(candidate)
    return removed
