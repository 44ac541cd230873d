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
- Otherwise a waiter thread does the blocking ``flock`` on the descriptor while the caller waits for it with a
  timeout.  If the caller gives up first, the waiter still gets the lock eventually, releases it at once and closes
  its descriptor.  Starting a thread for every contended wait costs more (about 15-40% of the throughput at 10
  processes), hence the first way where it is safe.

Either way nobody ever proceeds without the lock, and an abandoned wait never leaks it.

The lock file is created if missing and never unlinked: unlinking would let two processes lock two different inodes.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path

from filelock import lock_descriptor


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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
            self._held.fd = _wait_in_thread(fd, timeout, self.path)

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


def _wait_in_thread(fd: int, timeout: float, path: str) -> int:
    """Block in ``flock`` on *fd* in a thread; return *fd* once locked, or raise LockBusy after *timeout*.

    From the moment the thread starts, *fd* belongs to whoever ends up with the lock: the caller, or (if the caller
    gave up) the thread, which then unlocks and closes it.
    """
    got = threading.Event()
    handover = threading.Lock()
    state = {"abandoned": False}
    errors: list[OSError] = []

    def wait() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            errors.append(exc)
            got.set()
            return
        with handover:
            if not state["abandoned"]:
                got.set()
                return
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    threading.Thread(target=wait, name=f"flock {path}", daemon=True).start()
    got.wait(timeout)
    with handover:
        if got.is_set():
            if errors:
                os.close(fd)
                raise errors[0]
            return fd
        state["abandoned"] = True
    raise LockBusy(path)
