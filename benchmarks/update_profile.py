"""Issue 14: where one durable update's time goes, and the update rate against SQLite WAL FULL, interleaved.

    python -m benchmarks.update_profile                 # profile + 4 interleaved rounds of 300 updates each
    python -m benchmarks.update_profile --rounds 6 --ops 500

The profile times one progress report (``Registry.update``, one process, the 20 KB sample task) between the store's
crash points, which mark every step of the write protocol: lock and group-commit bookkeeping, read + apply +
serialize, temp file write, fsync, rename, then directory fsync + ``.bak`` copy + unlock.  The comparison runs, in
each round and in a random order, ``--ops`` updates of: the reference; SQLite WAL ``synchronous=FULL`` (one
``UPDATE`` per op); and a *what-if* store (:class:`JournalJsonFile`, benchmark only) that makes an update durable
with one fdatasync of an append to a reused journal file and replaces the registry by a rename without fsync:
the design SQLite's rate would take, measured so that the gap and what closing it needs are figures, not guesses.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from registry import Registry, store
from registry.store import JsonFile

from .workloads import NullSessions, sqlite_setup
from .workspace import Workspace, sample_task, with_active, write_workspace

STEPS = (("start", "holding_lock", "lock, group-commit checks, crash recovery check"),
         ("holding_lock", "before_temp_write", "read + parse the task registry, apply, serialize"),
         ("before_temp_write", "after_temp_write", "create the temp file, write 20 KB"),
         ("after_temp_write", "after_fsync", "fsync the temp file, close"),
         ("after_fsync", "after_rename", "rename over the registry"),
         ("after_rename", "end", "fsync the directory, .bak copy, unlock, wake waiters"))


class JournalJsonFile(JsonFile):
    """What-if: durable by one fdatasync of a record appended to a preallocated journal that is reused in a ring;
    the registry itself is replaced by a rename that is not fsynced (readers see every update at once; after a
    crash the journal's last record would be replayed).  Recovery and checkpointing are not built: this measures
    the write path only."""

    RING = 4 << 20

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        journal = path.with_name(f".{path.name}.journal")
        self._jfd = os.open(journal, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if os.fstat(self._jfd).st_size < self.RING:
            os.posix_fallocate(self._jfd, 0, self.RING)
            os.fsync(self._jfd)
        self._offset = 0

    def _replace(self, dir_fd: int, data: bytes) -> None:
        record = len(data).to_bytes(8, "little") + data
        if self._offset + len(record) > self.RING:
            self._offset = 0
        os.pwrite(self._jfd, record, self._offset)
        os.fdatasync(self._jfd)
        self._offset += len(record)
        tmp = f".{self.path.name}.{os.getpid()}.j.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def _write_backup(self, data: bytes) -> None:
        return None


def _workspace(root: Path, name: str) -> Workspace:
    return write_workspace(root / name, with_active(sample_task(), 10))


def profile(root: Path, n: int) -> list[tuple[str, float]]:
    """Median time of each step of one update, in ms."""
    ws = _workspace(root, "profile")
    reg = Registry(ws.base, sessions=NullSessions(), heal=False)
    agent = ws.active_ids[0]
    marks: dict[str, float] = {}
    samples: dict[str, list[float]] = {a: [] for a, _, _ in STEPS}

    def hook(point: str, path: Path) -> None:
        if path == ws.task_path:
            marks.setdefault(point, time.perf_counter())

    old = store.set_crash_hook(hook)
    try:
        for seq in range(n + 20):
            marks.clear()
            marks["start"] = time.perf_counter()
            reg.update(ws.task_id, agent, progress=seq % 101)
            marks["end"] = time.perf_counter()
            if seq >= 20:
                for a, b, _ in STEPS:
                    samples[a].append(marks[b] - marks[a])
    finally:
        store.set_crash_hook(old)
    return [(what, statistics.median(samples[a]) * 1e3) for a, _, what in STEPS]


def _reference(ws: Workspace, file_cls: type[JsonFile] | None) -> Callable[[int], None]:
    reg = Registry(ws.base, sessions=NullSessions(), heal=False)
    if file_cls is not None:
        reg._files[ws.task_id] = file_cls(ws.task_path, validate=reg.task_file(ws.task_id).validate)
    agent = ws.active_ids[0]

    def op(seq: int) -> None:
        reg.update(ws.task_id, agent, progress=seq % 101)

    return op


def _sqlite(ws: Workspace, db: Path) -> Callable[[int], None]:
    sqlite_setup(ws, db)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    agent = ws.active_ids[0]

    def op(seq: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE agents SET progress = ?, last_update = ? WHERE id = ?",
                     (seq % 101, datetime.now().isoformat(), agent))
        conn.execute("COMMIT")

    return op


def interleaved(root: Path, rounds: int, ops: int) -> dict[str, list[float]]:
    cases: dict[str, Callable[[int], None]] = {
        "reference": _reference(_workspace(root, "ref"), None),
        "sqlite-wal-full": _sqlite(_workspace(root, "lite"), root / "lite.sqlite"),
        "what-if journal (1 fdatasync, rename unsynced)": _reference(_workspace(root, "journal"), JournalJsonFile),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        order = list(cases)
        random.shuffle(order)
        for name in order:
            op = cases[name]
            for seq in range(20):
                op(seq)
            t0 = time.perf_counter()
            for seq in range(ops):
                op(seq)
            rates[name].append(ops / (time.perf_counter() - t0))
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.update_profile")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ops", type=int, default=300)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="orch-update-"))
    print(f"load average before: {os.getloadavg()}")
    steps = profile(root, args.ops)
    total = sum(ms for _, ms in steps)
    print(f"one update (median of {args.ops}), {total:.3f} ms summed over the steps:")
    for what, ms in steps:
        print(f"  {ms:7.3f} ms  {ms / total:5.1%}  {what}")
    rates = interleaved(root, args.rounds, args.ops)
    lite = statistics.median(rates["sqlite-wal-full"])
    print(f"interleaved, {args.rounds} rounds of {args.ops} updates each (median round):")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"  {name:>48}: {med:7,.0f} ops/s  {med / lite:5.2f}x SQLite  (rounds: "
              + ", ".join(f"{v:,.0f}" for v in values) + ")")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
