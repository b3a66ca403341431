"""
Owner-only files for keys and tokens, shared by the relay and the bridge.

A secret is written to a fresh temporary file that is created with mode 0600
(so it is never readable by anyone else, not even between the write and a
later chmod), synced, and then renamed over the target: readers see either the
old secret or the new one, never half of one.
"""

from __future__ import annotations

import os
import secrets

from twisted.python.filepath import FilePath

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


class InsecureFileError(Exception):
    """
    A secret file can be read or written by users other than its owner.
    """

    def __init__(self, path: str, mode: int) -> None:
        super().__init__(
            f"{path} is accessible by group or others (mode {mode:04o}); run: chmod 600 {path}"
        )
        self.path = path
        self.mode = mode


def write_secret(path: FilePath[str] | str, data: bytes) -> None:
    """
    Atomically replace C{path} with C{data}, readable by its owner only.

    Missing parent directories are created with mode 0700.
    """
    target = _as_path(path)
    directory = target.parent()
    _make_private_dirs(directory)
    temporary = directory.child(f".{target.basename()}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never reuse (or follow a symlink planted at) the temporary name.
    fd = os.open(temporary.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE)
    try:
        try:
            # The umask can only narrow the mode; pin it to exactly 0600.
            os.fchmod(fd, PRIVATE_FILE_MODE)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary.path, target.path)
    except BaseException:
        temporary.remove()
        raise
    _fsync_directory(directory)


def append_secret(path: FilePath[str] | str, data: bytes) -> None:
    """
    Append C{data} to the existing file C{path} (made by L{write_secret}, so
    owner-only) and sync it: on disk when this returns.  A crash during the
    write may leave part of C{data} at the end of the file.
    """
    # No O_CREAT: a missing file is an error, never a new file with another mode.
    fd = os.open(_as_path(path).path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        _write_all(fd, data)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def read_secret(path: FilePath[str] | str) -> bytes:
    """
    Read a secret file.  Callers that must refuse a file others can read
    call L{check_private} first.
    """
    return _as_path(path).getContent()


def check_private(path: FilePath[str] | str) -> None:
    """
    Raise L{InsecureFileError} if C{path} is accessible by group or others.
    """
    target = _as_path(path)
    mode = os.stat(target.path).st_mode & 0o7777
    if mode & 0o077:
        raise InsecureFileError(target.path, mode)


def _as_path(path: FilePath[str] | str) -> FilePath[str]:
    return path if isinstance(path, FilePath) else FilePath(path)


def _make_private_dirs(directory: FilePath[str]) -> None:
    # Not os.makedirs(mode=...): it gives intermediate directories the default
    # mode, and every directory we create may end up holding secrets.
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent()
    for each in reversed(missing):
        try:
            os.mkdir(each.path, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # created concurrently; leave its mode alone
        os.chmod(each.path, PRIVATE_DIR_MODE)  # mkdir's mode is subject to the umask


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: FilePath[str]) -> None:
    # Makes the rename itself durable across a crash.
    fd = os.open(directory.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
