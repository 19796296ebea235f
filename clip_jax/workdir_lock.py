"""An exclusive lock on a training workdir, so two runs never write the same checkpoints.

The lock is `fcntl.flock` on `<workdir>/train.lock`, held for the whole run. The kernel releases
it when the holding process dies (crash, SIGKILL, OOM kill), so a crashed run never leaves a
stale lock behind, unlike a pid file that has to be judged stale by guesswork. The file also
holds the holder's host, pid and start time (JSON) for the error message of a second run; it is
never deleted (deleting a lock file lets two processes lock two different inodes).

Filesystems: local filesystems and NFS (Linux emulates flock with NFS byte-range locks, which
work across hosts; a dead client's lock expires with its lease, ~90 s on NFSv4). Filesystems
without locking (some FUSE mounts) make flock fail; the run then continues with a warning,
unprotected. In a multi-process run only process 0 takes the lock (the trainer shares the
outcome with the other processes).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock; the message names it."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` or `acquire()` / `release()`. The workdir must exist."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirLockedError naming the holder (host, pid, start)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise WorkdirLockedError(
                f"workdir {self.workdir} is in use by another clip_jax.train run ({holder}); "
                f"wait for it to end or use another --workdir"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            logging.warning(
                "cannot lock %s (%s): this filesystem has no file locks, so a "
                "second run on this workdir would not be detected",
                self.path,
                e.strerror,
            )
            os.close(fd)
            return
        self._fd = fd
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record:
        return "holder unknown: it has not written train.lock yet"
    return (
        f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
        f"started {record.get('started', '?')}"
    )
