"""Item 2 of issue 6: lock acquire+release uncontended, and lock wait under contention (p50/p95/p99).

Uncontended: a raw ``fcntl.flock`` pair on an open descriptor (what the kernel costs), the store's own lock
(``JsonFile.locked()``, :class:`registry.locking.FlockLock` since fafdb09: open the sidecar, a non-blocking flock,
close), the store's previous lock (``filelock.FileLock`` polling every 0.5 ms) and filelock at its defaults.

Contended: 2, 4 and 10 processes run the same critical section, the store's read / change / durable write of a
20 KB task registry, under the store's lock, under a blocking ``fcntl.flock`` (the baseline of the lock-wait target)
and under the store's previous filelock.  Only the lock differs.  The wait percentiles are in extra_info and in the
summary printed at the end.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import pytest

from registry.store import JsonFile

from . import knobs
from .conftest import gate, median_s
from .workers import Workers
from .workloads import LOCKS, FileLockJsonFile, store_rmw
from .workspace import Workspace, sample_task, with_active, write_workspace

PROCS = (2, 4, 10)
OPS_PER_ROUND = 600
ROUNDS = 3


def _raw_flock(path: Path) -> Iterator[Callable[[], None]]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def pair() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)
        knobs.delay()

    yield pair
    os.close(fd)


def _store_lock(path: Path) -> Iterator[Callable[[], None]]:
    file = JsonFile(path)

    def pair() -> None:
        with file.locked():
            pass
        knobs.delay()

    yield pair


def _filelock_store_before(path: Path) -> Iterator[Callable[[], None]]:
    file = FileLockJsonFile(path)

    def pair() -> None:
        with file.locked():
            pass
        knobs.delay()

    yield pair


def _filelock_default(path: Path) -> Iterator[Callable[[], None]]:
    lock = filelock.FileLock(str(path) + ".lock")

    def pair() -> None:
        with lock:
            pass
        knobs.delay()

    yield pair


def _store_lock_name(directory: Path) -> str:
    """What the store locks with today (it changed from filelock to registry.locking.FlockLock)."""
    lock = JsonFile(directory / "probe.json")._lock
    return f"{type(lock).__module__}.{type(lock).__qualname__}"


UNCONTENDED = {"raw-flock": _raw_flock, "store-lock": _store_lock, "filelock-0.5ms-poll": _filelock_store_before,
               "filelock-defaults": _filelock_default}


@gate
@pytest.mark.parametrize("lock", list(UNCONTENDED))
def test_lock_uncontended(benchmark: Any, record: Any, tmp_path: Path, lock: str) -> None:
    benchmark.group = "lock acquire+release, uncontended"
    make = UNCONTENDED[lock](tmp_path / "AGENT_REGISTRY.json")
    pair = next(make)
    benchmark(pair)
    next(make, None)
    record(bench="lock-uncontended", lock=lock, median_us=round(median_s(benchmark) * 1e6, 3),
           store_lock=_store_lock_name(tmp_path))


@pytest.fixture
def sample_ws(tmp_path: Path) -> Workspace:
    """The 20 KB sample task registry with ten active agents, one per worker."""
    return write_workspace(tmp_path / "ws", with_active(sample_task(), 10))


@pytest.mark.parametrize("procs", PROCS)
@pytest.mark.parametrize("lock", LOCKS)
def test_lock_wait_under_contention(benchmark: Any, record: Any, sample_ws: Workspace, lock: str, procs: int) -> None:
    benchmark.group = f"lock wait, {procs} processes (same critical section, different locks)"
    with Workers(procs, store_rmw(sample_ws, lock), OPS_PER_ROUND // procs) as pool:
        pool.round()  # warm-up
        pool.reset()
        benchmark.pedantic(pool.round, rounds=ROUNDS, iterations=1)
        summary = pool.summary(median_s(benchmark))
    record(bench="lock-contention", lock=lock, registry_bytes=len(sample_ws.task_bytes),
           store_lock=_store_lock_name(sample_ws.base), **summary)
