"""The operations the throughput and contention benchmarks run in each worker, one factory per workload.

Every factory takes the workspace (and options) and returns ``factory(index) -> op(seq) -> lock_wait_ns | None``
for :class:`benchmarks.workers.Workers`.  Worker *index* works on its own agent (``index`` modulo the active agents),
so operations contend for the file, never for the agent.

Besides the reference and legacy registries there are three baselines, built here and nowhere else:

* ``flock_json_rmw``: blocking ``fcntl.flock``, ``json.loads``, ``json.dumps(indent=2)``, durable replace (temp
  file, fsync, rename, fsync of the directory): the hand-measured baseline of issue 6.
* ``sqlite_wal``: one row per agent in SQLite, ``journal_mode=WAL``, ``synchronous=FULL``, ``BEGIN IMMEDIATE``.
* *what-if* stores (:class:`FlockJsonFile`, :class:`NoBackupJsonFile`, :class:`LinkBackupJsonFile`,
  :class:`FileLockJsonFile`): subclasses of the reference's :class:`registry.store.JsonFile` that change one thing
  (the lock policy, the ``.bak`` copy) so that a recommendation for ``registry/store.py`` comes with its measured
  effect, and the store's previous lock (filelock) can be measured against the current one.  They are labelled
  "what-if" (or "before") wherever they are reported; the reference itself is always measured unmodified.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from registry import Registry
from registry.archive import GlobalFile
from registry.legacy import LegacyRegistry
from registry.sessions import TmuxSessions
from registry.store import JsonFile

from .workers import Factory, Op
from .workspace import Workspace

clock = time.perf_counter_ns


class NullSessions(TmuxSessions):
    """No tmux at all: ``start`` and ``kill`` do nothing.  Only for measurements labelled registry-only."""

    def start(self, name: str, command: str, environment: Any = None) -> None:
        return None

    def kill(self, name: str) -> bool:
        return True

    def alive(self) -> set[str]:
        return set()


class TimedSessions(TmuxSessions):
    """Real tmux, with the time each ``start`` took recorded, to split a deploy into registry time and tmux time."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_times_ns: list[int] = []
        self.started: list[str] = []

    def start(self, name: str, command: str, environment: Any = None) -> None:
        t0 = clock()
        super().start(name, command, environment)
        self.start_times_ns.append(clock() - t0)
        self.started.append(name)


# -- what-if stores (benchmark-only variants of the reference store) --------------------------------------------------


class FlockJsonFile(JsonFile):
    """What-if: the reference store with a plain blocking ``fcntl.flock`` on a persistent descriptor.

    It waits forever (no timeout, no non-blocking first try, no waiter thread), which the reference must not do; it
    is here to measure what the store's lock policy costs against the kernel's own queue.  Since it never reports
    the lock busy, group commit never queues an update on it: it is also the reference *without* group commit.
    """

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.waits_ns: list[int] = []

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        t0 = clock()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.waits_ns.append(clock() - t0)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


class _AlarmFired(BaseException):
    """Raised by the SIGALRM handler to cut a blocking flock short (BaseException: nothing in between catches it)."""


class ItimerJsonFile(JsonFile):
    """What-if: a blocking ``flock`` in the calling thread, its timeout kept by ``setitimer`` (main thread only).

    A non-blocking try first; when the lock is busy, the main thread blocks in ``flock(LOCK_EX)`` itself (the
    kernel wakes it at release, no hand-off) under an interval timer whose SIGALRM handler raises.  If the alarm
    races a successful ``flock``, a non-blocking probe on our own descriptor says whether we hold the lock.  Other
    threads fall back to the store's own lock.  SIGALRM is process-wide, hence "what-if": it would clash with
    pytest-timeout's signal method.
    """

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._armed = False
        self.waits_ns: list[int] = []

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self._armed:
            raise _AlarmFired

    def _acquire(self, timeout: float) -> None:
        import signal
        import threading

        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if timeout == 0:
                raise TimeoutError(self.lock_path) from None
        if threading.current_thread() is not threading.main_thread() or timeout < 0:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # what-if simplification: other threads and "forever" just block
            return
        old = signal.signal(signal.SIGALRM, self._on_alarm)
        try:
            try:
                self._armed = True
                signal.setitimer(signal.ITIMER_REAL, timeout)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                self._armed = False
        except _AlarmFired:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TimeoutError(self.lock_path) from None
        finally:
            signal.signal(signal.SIGALRM, old)

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        t0 = clock()
        wait = self.lock_timeout if timeout is None else timeout
        try:
            self._acquire(wait)
        except TimeoutError as exc:  # as the store says it, so that group commit queues the update
            raise self.timed_out(wait) from exc
        self.waits_ns.append(clock() - t0)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


class NoBackupJsonFile(JsonFile):
    """What-if: the reference store without the ``.bak`` copy it makes of every write (``JsonFile._write_backup``)."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        if not callable(getattr(JsonFile, "_write_backup", None)):  # do not measure a variant that changes nothing
            raise RuntimeError("registry.store.JsonFile no longer has _write_backup: update NoBackupJsonFile")
        super().__init__(path, **kwargs)

    def _write_backup(self, data: bytes) -> None:
        return None


class LinkBackupJsonFile(NoBackupJsonFile):
    """What-if: the ``.bak`` made as a hard link to the file just committed instead of a copy of its bytes.

    The registry file is only ever replaced, never written in place, so a second name for the committed inode is an
    exact snapshot: no data written, and no rename over ``.bak`` of a file whose blocks are still unallocated (which
    is what makes ext4's auto_da_alloc flush the copy).
    """

    def _write_backup(self, data: bytes) -> None:
        from registry.store import backup_path

        tmp = self.path.parent / f".{self.path.name}.bak.{os.getpid()}.link.tmp"
        try:
            os.link(self.path, tmp)
            tmp.replace(backup_path(self.path))
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()


class FlockNoBackupJsonFile(FlockJsonFile, NoBackupJsonFile):
    """What-if: both changes."""


class FlockLinkBackupJsonFile(FlockJsonFile, LinkBackupJsonFile):
    """What-if: a blocking flock and the hard-link backup."""


class ItimerLinkBackupJsonFile(ItimerJsonFile, LinkBackupJsonFile):
    """What-if: the itimer-bounded blocking flock and the hard-link backup."""


class FileLockJsonFile(JsonFile):
    """Before: the store's lock until fafdb09, ``filelock.FileLock`` polling every 0.5 ms (``poll`` seconds)."""

    def __init__(self, path: Path, *, poll: float = 0.0005, **kwargs: Any) -> None:
        import filelock

        super().__init__(path, **kwargs)
        self._filelock = filelock.FileLock(self.lock_path, thread_local=True, fallback_to_soft=False,
                                           poll_interval=poll)
        self.waits_ns: list[int] = []

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        import filelock

        t0 = clock()
        wait = self.lock_timeout if timeout is None else timeout
        try:
            self._filelock.acquire(timeout=wait)
        except filelock.Timeout as exc:  # as the store says it, so that group commit queues the update
            raise self.timed_out(wait) from exc
        self.waits_ns.append(clock() - t0)
        try:
            yield
        finally:
            self._filelock.release()


STORE_VARIANTS: dict[str, type[JsonFile]] = {
    "flock": FlockJsonFile, "no-bak": NoBackupJsonFile, "flock+no-bak": FlockNoBackupJsonFile,
    "link-bak": LinkBackupJsonFile, "flock+link-bak": FlockLinkBackupJsonFile, "filelock": FileLockJsonFile,
    "itimer": ItimerJsonFile, "itimer+link-bak": ItimerLinkBackupJsonFile,
}


def _timed_acquire(file: JsonFile, sink: list[int]) -> None:
    """Record how long each acquisition of *file*'s lock waits (instrumentation only; the lock is unchanged).

    Only acquisitions that got the lock are recorded.  With group commit a contended update does not wait in the
    lock at all: it queues, and most often a batch led by another process applies it, so its time is in the
    per-operation latency (``op p50/p99``), and the lock-wait figures of ``reference-*`` workloads cover only the
    leaders' acquisitions.  Lock wait under contention is measured on the bare lock in ``test_lock.py``.
    """
    lock = file._lock
    acquire = lock.acquire

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        result = acquire(*args, **kwargs)
        sink.append(clock() - t0)
        return result

    lock.acquire = timed  # type: ignore[method-assign]


def _reference(ws: Workspace, variant: str | None) -> tuple[Registry, list[int]]:
    """A Registry in this (forked) process, with the store variant asked for (None: the store as shipped)."""
    reg = Registry(ws.base, sessions=NullSessions(), heal=False)
    if variant is not None:
        cls = STORE_VARIANTS[variant]
        reg._files[ws.task_id] = cls(ws.task_path, validate=reg.task_file(ws.task_id).validate)
        global_cls = type(f"Global{cls.__name__}", (cls, GlobalFile), {})  # the variant, reading the archive too
        reg.global_file = global_cls(ws.global_path, validate=reg.global_file.validate)
    file = reg.task_file(ws.task_id)
    if isinstance(file, FlockJsonFile | FileLockJsonFile | ItimerJsonFile):
        return reg, file.waits_ns
    waits: list[int] = []
    _timed_acquire(file, waits)
    return reg, waits


def _last(waits: list[int]) -> int | None:
    return waits.pop() if waits else None


def reference_update(ws: Workspace, *, variant: str | None = None) -> Factory:
    """Progress reports on distinct agents through ``Registry.update`` (the task registry only)."""
    active = ws.active_ids

    def factory(index: int) -> Op:
        reg, waits = _reference(ws, variant)
        agent = active[index % len(active)]

        def op(seq: int) -> int | None:
            waits.clear()
            reg.update(ws.task_id, agent, progress=seq % 101)
            return _last(waits)

        return op

    return factory


def reference_mixed(ws: Workspace, *, variant: str | None = None) -> Factory:
    """Per four operations: two progress reports, one status change (task and global registries), one status read.

    The status change toggles the worker's own agent between ``working`` and ``blocked``; the read is
    ``read_task`` + ``read_global`` (what a status call reads, without tmux).
    """
    active = ws.active_ids

    def factory(index: int) -> Op:
        reg, waits = _reference(ws, variant)
        agent = active[index % len(active)]

        def op(seq: int) -> int | None:
            waits.clear()
            kind = seq % 4
            if kind == 0:
                reg.update(ws.task_id, agent, status="blocked" if seq % 8 == 0 else "working")
            elif kind == 1:
                reg.read_task(ws.task_id)
                reg.read_global()
            else:
                reg.update(ws.task_id, agent, progress=seq % 101)
            return _last(waits)

        return op

    return factory


def legacy_update(ws: Workspace) -> Factory:
    """Progress reports on distinct agents through the unlocked legacy registry (torn reads count as errors)."""
    active = ws.active_ids

    def factory(index: int) -> Op:
        reg = LegacyRegistry(ws.base, sessions=NullSessions())
        agent = active[index % len(active)]

        def op(seq: int) -> int | None:
            reg.update(ws.task_id, agent, progress=seq % 101)
            return None

        return op

    return factory


def _durable_replace(path: Path, data: bytes, dir_fd: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    os.fsync(dir_fd)


def _set_progress(doc: dict[str, Any], agent_id: str, seq: int) -> None:
    for agent in doc["agents"]:
        if agent["id"] == agent_id:
            agent["progress"] = seq % 101
            agent["last_update"] = datetime.now().isoformat()
            return
    raise KeyError(agent_id)


def flock_json_rmw(ws: Workspace) -> Factory:
    """Baseline: blocking flock, stdlib json (``indent=2``), durable replace; the same change as reference_update."""
    active = ws.active_ids

    def factory(index: int) -> Op:
        path = ws.task_path
        lock_fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        agent = active[index % len(active)]

        def op(seq: int) -> int | None:
            t0 = clock()
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            wait = clock() - t0
            try:
                with open(path, "rb") as fh:
                    doc = json.loads(fh.read())
                _set_progress(doc, agent, seq)
                _durable_replace(path, json.dumps(doc, indent=2).encode(), dir_fd)
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
            return wait

        return op

    return factory


LOCKS = ("store", "flock", "filelock")


def store_rmw(ws: Workspace, lock: str) -> Factory:
    """One critical section, different locks: the store's own read / change / durable write of the task registry,
    under the store's lock as shipped (``store``: :class:`registry.locking.FlockLock` since fafdb09), a blocking
    ``fcntl.flock`` on a persistent descriptor (``flock``, the baseline of the lock-wait target), or the store's
    previous lock (``filelock``: ``filelock.FileLock`` polling every 0.5 ms).
    """
    active = ws.active_ids
    if lock not in LOCKS:
        raise ValueError(f"lock must be one of {LOCKS}, not {lock!r}")

    def factory(index: int) -> Op:
        file = FileLockJsonFile(ws.task_path) if lock == "filelock" else JsonFile(ws.task_path)
        agent = active[index % len(active)]
        lock_fd = os.open(file.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

        def change() -> None:
            doc = file.read()
            _set_progress(doc, agent, 0)
            file.write(doc)

        def with_store(seq: int) -> int | None:
            t0 = clock()
            with file.locked():
                wait = clock() - t0
                change()
            return wait

        def with_flock(seq: int) -> int | None:
            t0 = clock()
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            wait = clock() - t0
            try:
                change()
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
            return wait

        return with_flock if lock == "flock" else with_store

    return factory


def sqlite_setup(ws: Workspace, db: Path) -> None:
    """Create *db* (WAL) with one row per agent of the workspace's task."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS agents (id TEXT PRIMARY KEY, task_id TEXT, status TEXT,"
                     " progress INTEGER, last_update TEXT, doc TEXT)")
        doc = json.loads(ws.task_bytes)
        conn.executemany("INSERT OR REPLACE INTO agents VALUES (?, ?, ?, ?, ?, ?)",
                         [(a["id"], ws.task_id, a["status"], a.get("progress", 0), a.get("last_update"),
                           json.dumps(a)) for a in doc["agents"]])
    finally:
        conn.close()


def sqlite_wal(ws: Workspace, db: Path) -> Factory:
    """Baseline: ``UPDATE`` of the agent's row in ``BEGIN IMMEDIATE``, WAL, ``synchronous=FULL``.

    The reported lock wait is the time ``BEGIN IMMEDIATE`` took (SQLite's busy handler sleeps and retries).
    """
    active = ws.active_ids

    def factory(index: int) -> Op:
        conn = sqlite3.connect(db, isolation_level=None, timeout=60)
        conn.execute("PRAGMA synchronous=FULL")
        agent = active[index % len(active)]

        def op(seq: int) -> int | None:
            t0 = clock()
            conn.execute("BEGIN IMMEDIATE")
            wait = clock() - t0
            try:
                conn.execute("UPDATE agents SET progress = ?, last_update = ? WHERE id = ?",
                             (seq % 101, datetime.now().isoformat(), agent))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return wait

        return op

    return factory


WORKLOADS: dict[str, Callable[..., Factory]] = {
    "reference-update": reference_update,
    "reference-mixed": reference_mixed,
    "legacy-update": legacy_update,
    "flock-json-rmw": flock_json_rmw,
}
