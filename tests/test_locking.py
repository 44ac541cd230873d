"""The blocking flock with a timeout: both ways of bounding the wait, against a holder in another process."""

from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.locking import FlockLock, LockBusy

HOLD = """
import fcntl, sys, time
fd = open(sys.argv[1], "a")
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "reg.json.lock"


def _holder(path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def held(lock_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = _holder(lock_path, 30)
    yield proc
    proc.kill()
    proc.communicate()


def _in_thread(fn: object) -> BaseException | None:
    caught: list[BaseException] = []

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return caught[0] if caught else None


def test_the_main_thread_times_out_on_a_held_lock_and_leaves_no_alarm_behind(lock_path: Path,
                                                                             held: subprocess.Popen[str]) -> None:
    lock = FlockLock(lock_path)
    with pytest.raises(LockBusy):
        lock.acquire(timeout=0.2)
    assert not lock.is_locked
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_another_thread_times_out_on_a_held_lock(lock_path: Path, held: subprocess.Popen[str]) -> None:
    lock = FlockLock(lock_path)
    assert isinstance(_in_thread(lambda: lock.acquire(timeout=0.2)), LockBusy)


def test_a_sigalrm_handler_of_someone_else_is_left_alone(lock_path: Path, held: subprocess.Popen[str]) -> None:
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        with pytest.raises(LockBusy):
            FlockLock(lock_path).acquire(timeout=0.2)
        assert signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert fired == []


@pytest.mark.parametrize("where", ["main thread", "other thread"])
def test_a_lock_released_within_the_timeout_is_had(lock_path: Path, where: str) -> None:
    holder = _holder(lock_path, 0.3)
    lock = FlockLock(lock_path)
    try:
        if where == "main thread":
            lock.acquire(timeout=10)
            assert lock.is_locked
        else:
            assert _in_thread(lambda: lock.acquire(timeout=10)) is None
    finally:
        holder.communicate()
    probe = open(lock_path)  # noqa: SIM115 - closed below
    try:
        with pytest.raises(BlockingIOError):  # whoever acquired still holds it: a new descriptor cannot lock
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        probe.close()


def test_an_abandoned_wait_releases_the_lock_once_it_finally_gets_it(lock_path: Path) -> None:
    holder = _holder(lock_path, 0.5)
    lock = FlockLock(lock_path)
    assert isinstance(_in_thread(lambda: lock.acquire(timeout=0.1)), LockBusy)
    holder.communicate()
    deadline = time.monotonic() + 10
    while True:  # the waiter thread got the lock when the holder left, and must have let it go at once
        probe = open(lock_path)  # noqa: SIM115 - closed below
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            assert time.monotonic() < deadline, "the abandoned waiter kept the lock"
            time.sleep(0.01)
        finally:
            probe.close()
