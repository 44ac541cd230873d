"""An exclusive lock on a sidecar file: a blocking ``flock`` that still honours a timeout.

Why not ``filelock.FileLock`` itself: it waits by polling, and on a registry whose writes hold the lock for about
1 ms, polling either sleeps through most hand-overs (50 ms default: p99 wait ~100-300 ms at 10 processes) or burns
the CPU the holder needs (0.2 ms: half the throughput).  A blocking ``flock`` is woken by the kernel at release.
It is the same lock: the uncontended attempt goes through filelock's own primitive on the same file, so this lock
and a ``filelock.FileLock`` on ``<file>.lock`` exclude each other.

A blocking ``flock`` has no timeout, so when the lock is busy the wait is bounded one of two ways:

- In the main thread, when nobody else uses SIGALRM (no handler, no timer running: pytest-timeout's signal method,
  for one, installs a handler), an interval timer interrupts the blocking ``flock``.  The alarm may fire just after
  the ``flock`` succeeded; then asking again on the same descriptor tells which it was.
- Otherwise the caller polls: a non-blocking ``flock`` every 0.1 ms at first, backing off to every POLL_MAX.  A
  blocking ``flock`` in a helper thread would be woken at release, but nothing can interrupt it in a thread that is
  not the main one, so every wait given up would leave a thread and a descriptor behind until the holder let go
  (50 timeouts against a stopped holder: 50 threads).  A poll leaves nothing behind when it gives up.

Either way nobody ever proceeds without the lock, and an abandoned wait never leaks it.

The lock file is created if missing and never unlinked: unlinking would let two processes lock two different inodes.
It is opened without following a symlink, in a directory that must not be one either, and must be a regular file:
a symlink, a directory or a FIFO where the lock belongs is refused with :class:`registry.errors.UnsafePath`, as is
any other failure to open it (naming the file and the fix), and never followed or created through.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import threading
import time
from pathlib import Path

from filelock import lock_descriptor

from .errors import UnsafePath

#: The longest sleep between two tries of a polled wait (see the module docstring).
POLL_MAX = 0.005


class LockBusy(TimeoutError):
    """The lock was not had within the timeout."""


class FlockLock:
    """Exclusive, non-reentrant lock on *path*.

    Every acquisition opens a descriptor of its own, so threads sharing this object exclude each other as processes
    do.  ``timeout``: ``< 0`` waits forever, ``0`` tries once, ``> 0`` waits that many seconds, then LockBusy.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._held = threading.local()

    @property
    def is_locked(self) -> bool:
        """Whether the calling thread holds the lock."""
        return getattr(self._held, "fd", None) is not None

    def acquire(self, timeout: float) -> None:
        if self.is_locked:
            raise RuntimeError(f"{self.path} is already locked by this thread")
        fd = open_lock_file(Path(self.path))
        try:
            if lock_descriptor(fd, blocking=False):
                self._held.fd = fd
                return
            if timeout == 0:
                raise LockBusy(self.path)
            if timeout < 0:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._held.fd = fd
                return
        except BaseException:
            os.close(fd)
            raise
        if _alarm_is_free():
            self._held.fd = _wait_with_alarm(fd, timeout, self.path)
        else:
            self._held.fd = _wait_polling(fd, timeout, self.path)

    def release(self) -> None:
        fd, self._held.fd = getattr(self._held, "fd", None), None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


class _Expired(Exception):
    pass


def _alarm_is_free() -> bool:
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN)
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))


def _wait_with_alarm(fd: int, timeout: float, path: str) -> int:
    """Block in ``flock`` on *fd* until an interval timer says *timeout* has passed; return *fd* once locked."""
    armed = [True]  # the handler raises only while the flock may still be waiting

    def expire(signum: int, frame: object) -> None:
        if armed[0]:
            armed[0] = False
            raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            finally:
                armed[0] = False
        except _Expired:
            pass
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        # Locked, unless the alarm cut the wait short; if it fired just after the flock, this descriptor holds it.
        if lock_descriptor(fd, blocking=False):
            return fd
    except BaseException:
        os.close(fd)
        raise
    finally:
        signal.signal(signal.SIGALRM, previous)
    os.close(fd)
    raise LockBusy(path)


def _wait_polling(fd: int, timeout: float, path: str) -> int:
    """Try to lock *fd* until *timeout* has passed, sleeping a little longer after each try; return *fd* once locked.

    On LockBusy (or any other error) *fd* is closed: nothing outlives the wait.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0001
    try:
        while not lock_descriptor(fd, blocking=False):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockBusy(path)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, POLL_MAX)
    except BaseException:
        os.close(fd)
        raise
    return fd


_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_lock_file(path: Path) -> int:
    """A descriptor of the lock file *path*, created if missing, opened without following a symlink.

    FileNotFoundError when its directory is missing; UnsafePath for anything that is not a regular file in a real
    directory (the directory is looked at first, and the open itself follows no symlink), or that cannot be opened.
    """
    try:
        if not stat.S_ISDIR(os.lstat(path.parent).st_mode):
            raise OSError(errno.ENOTDIR, "not a directory")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _unusable(path.parent, exc, "the lock's directory") from exc
    try:
        fd = os.open(path, _LOCK_FLAGS, 0o644)
    except OSError as exc:
        raise _unusable(path, exc, "the lock") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{path} is not a regular file, where the registry keeps its lock file. Nothing was"
                         " written; move it out of the way (the registry recreates the lock).", path=str(path))
    return fd


def _unusable(path: Path, exc: OSError, what: str) -> UnsafePath:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO):
        reason = ("is a symlink" if path.is_symlink() else "is not a regular file" if what == "the lock"
                  else "is not a directory")
        return UnsafePath(f"{path} {reason}, where the registry keeps {what}. It was not followed and nothing was"
                          " written; move it out of the way.", path=str(path), errno=exc.errno)
    return UnsafePath(f"cannot open {path}, {what}: {exc.strerror or exc}. Nothing was written; fix its permissions"
                      " or free space, then retry.", path=str(path), errno=exc.errno)
