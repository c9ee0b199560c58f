"""One writer per directory: an exclusive lock held while a command writes a folder (a run directory).

:func:`lock_dir` takes ``fcntl.flock`` on a lock file inside the folder and writes who holds it (pid,
host, command, start time) into that file; a second writer is refused at once with
:class:`DirLockedError`, one line naming the holder. Readers take no lock. The lock file is the one
file of the tool written in place (its inode is what is locked); it is removed when the lock is
released, and the system releases the lock of a process that died (a SIGKILL leaves at most an
empty-handed lock file, which the next writer takes over).

Under a multi-process launch only the main process locks (the other ranks write nothing).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from kernel.dist import is_main_process
from kernel.errors import UserError

LOCK_NAME = ".lock"


class DirLockedError(UserError, RuntimeError):
    """Another process is writing the folder; the message names it (pid, host, command, since)."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (it has not said which yet)"
    return (f"pid {info.get('pid')} on {info.get('host')} running `{info.get('command')}` since "
            f"{info.get('since')}")


class DirLock:
    """A held lock (see the module docstring); :meth:`release` (or ``with``) gives it back."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a waiting writer then re-opens a fresh file
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock is never kept by an object nobody holds
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit; the system releases the lock anyway
            pass


def lock_dir(folder, what: str = "directory") -> DirLock:
    """Lock ``folder`` (which exists) for this process, or raise :class:`DirLockedError` naming the holder."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    if not is_main_process():
        return DirLock(path, None)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DirLockedError(f"{folder}: this {what} is being written by {holder}; wait for it to finish (or stop "
                                 "it), then run the command again") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (and removed) the file between our open and our lock: take the new one
            os.close(fd)
            continue
        since = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "since": since}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode("utf-8"))
        return DirLock(path, fd)
