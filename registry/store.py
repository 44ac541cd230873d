"""The locked, crash-safe JSON file that every registry write goes through.

A write is one transaction: take the exclusive lock on the sidecar ``<file>.lock`` (never unlinked, so every process
locks the same inode), read, let the caller change the document, and replace the file atomically::

    temp file in the same directory -> write -> flush -> fsync -> os.replace -> fsync(directory)

Readers open the path and so see either the old file or the new one, never a torn one.  After the replace, the new
bytes are also copied to ``<file>.bak``, the backup that :mod:`registry.health` restores from: the last content this
store committed, never an uncommitted one.  (A copy of the *previous* content would lose the last committed change on
restore: an agent registered since would become a leaked session.)  The copy overwrites the backup in place, neither
fsynced nor renamed: a rename or a truncation to zero makes ext4 flush the file at once, which cost a third of every
write.  A crash mid-copy can tear the backup; restore parses a backup before trusting it.  A hard link would cost
nothing, but an in-place writer (the legacy code) would then tear the backup along with the registry.

Chaos tests need to stop a process at precise points of this protocol; :func:`set_crash_hook` installs a callable
that is told each point as it is passed.  Unused, a point costs one test of a module global.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from . import groupcommit
from .errors import CorruptRegistry, LockTimeout, WriteFailed
from .locking import FlockLock, LockBusy

#: Seconds to wait for a lock when the caller does not say.  ``ORCH_LOCK_TIMEOUT`` overrides it.
DEFAULT_LOCK_TIMEOUT = float(os.environ.get("ORCH_LOCK_TIMEOUT", "30"))

#: Every point of the write protocol a crash hook is told about, in the order they are passed.
CRASH_POINTS = (
    "holding_lock",  # the lock was just acquired, nothing read yet
    "before_temp_write",  # the temp file is about to be created
    "after_temp_write",  # the new bytes are in the temp file, not yet fsynced
    "after_fsync",  # the temp file is durable, not yet renamed over the registry
    "after_rename",  # the registry was replaced, the directory not yet fsynced
    "between_task_and_global",  # (ops) the task registry is written, the global registry not yet
)

CrashHook = Callable[[str, Path], None]
_crash_hook: CrashHook | None = None


def set_crash_hook(hook: CrashHook | None) -> CrashHook | None:
    """Install *hook* to be called as ``hook(point, path)`` at each of :data:`CRASH_POINTS`; return the old one.

    The hook may do anything a fault would: ``os._exit`` (a crash), raise ``OSError(ENOSPC)`` (a full disk), sleep.
    """
    global _crash_hook
    old, _crash_hook = _crash_hook, hook
    return old


def crash_point(point: str, path: Path) -> None:
    if _crash_hook is not None:
        _crash_hook(point, path)


@dataclass
class IoStats:
    """Registry reads and writes made by this process, for tests that count loads and for benchmarks."""

    reads: int = 0
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0

    def reset(self) -> None:
        self.reads = self.bytes_read = self.writes = self.bytes_written = 0


io_stats = IoStats()


def dumps(doc: Any) -> bytes:
    """Serialize *doc* as indented, standard JSON (``json.load`` reads it)."""
    try:
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    except TypeError:  # e.g. an integer wider than 64 bits, which orjson refuses and json accepts
        return json.dumps(doc, indent=2, ensure_ascii=False).encode()


def parse(data: bytes, path: Path) -> Any:
    """Parse registry bytes, or raise CorruptRegistry naming the file, the line and column, and the backup."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise corrupt(path, f"invalid UTF-8 at line {line} column {column}", line=line, column=column) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        what = (f"it is empty (nothing at line {exc.lineno} column {exc.colno})" if not text.strip()
                else f"{exc.msg} at line {exc.lineno} column {exc.colno}")
        raise corrupt(path, what, line=exc.lineno, column=exc.colno) from exc


_TEMP = re.compile(r"\.(?P<name>.+?)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def stale_temp_files(directory: Path) -> list[Path]:
    """Temp files in *directory* left by writers that died before their rename (their pid is gone)."""
    stale = []
    for path in sorted(directory.glob(".*.tmp")):
        match = _TEMP.fullmatch(path.name)
        if match is None:
            continue
        try:
            os.kill(int(match["pid"]), 0)
        except ProcessLookupError:
            stale.append(path)
        except PermissionError:  # alive, someone else's
            pass
    return stale


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def corrupt(path: Path, what: str, **details: Any) -> CorruptRegistry:
    backup = backup_path(path)
    if backup.exists():
        advice = f"restore the last good copy with `orch-registry repair --restore --base {path.parent.parent}`" \
                 f" (backup: {backup})"
    else:
        advice = f"no backup exists; `orch-registry repair --restore --base {path.parent.parent}` rebuilds what it can"
    return CorruptRegistry(f"{path} is corrupt: {what}. The file was left untouched; {advice}.",
                           path=str(path), backup=str(backup) if backup.exists() else None, **details)


class JsonFile:
    """One registry file and its lock.

    >>> f = JsonFile(tmp / "AGENT_REGISTRY.json")            # doctest: +SKIP
    >>> with f.transaction(default=dict) as doc:              # doctest: +SKIP
    ...     doc["total_spawned"] = doc.get("total_spawned", 0) + 1
    """

    def __init__(self, path: Path, *, validate: Callable[[Any], list[str]] | None = None,
                 lock_timeout: float | None = None) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.validate = validate
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT if lock_timeout is None else lock_timeout
        # A blocking flock with a timeout (see registry.locking for why not filelock's polling).  Each acquisition
        # has a descriptor of its own, so threads sharing this object exclude each other as processes do.
        self._lock = FlockLock(self.lock_path)

    # -- locking ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the exclusive lock.  ``timeout``: None for the default, < 0 waits forever, 0 tries once.

        Raises LockTimeout (a TimeoutError) when the lock cannot be had in time; never proceeds without it.
        """
        wait = self.lock_timeout if timeout is None else timeout
        try:
            self._lock.acquire(timeout=wait)
        except LockBusy as exc:
            raise self.timed_out(wait) from exc
        try:
            crash_point("holding_lock", self.path)
            groupcommit.recover(self.path, self._current_bytes)
            yield
        finally:
            self._lock.release()

    def timed_out(self, wait: float) -> LockTimeout:
        """The LockTimeout for a wait of *wait* seconds that did not get the lock."""
        return LockTimeout(
            f"could not lock {self.path} within {wait:g} s: another process holds {self.lock_path}. Nothing was"
            " written. A flock dies with its process, so this is a live holder: retry, or raise"
            " ORCH_LOCK_TIMEOUT if writes are legitimately slow.", path=str(self.path), timeout=wait)

    def _current_bytes(self) -> bytes | None:
        try:
            with open(self.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    # -- reading ------------------------------------------------------------------------------------------------

    def read(self) -> Any:
        """Read and parse the file without locking (the replace is atomic).  FileNotFoundError if it is missing."""
        return self._load()[0]

    def load(self) -> tuple[Any, bytes]:
        """The parsed document and the bytes it was parsed from (no lock taken).  FileNotFoundError if missing."""
        return self._load()

    def _load(self) -> tuple[Any, bytes]:
        with open(self.path, "rb") as fh:
            data = fh.read()
        io_stats.reads += 1
        io_stats.bytes_read += len(data)
        doc = parse(data, self.path)
        if self.validate is not None and (problems := self.validate(doc)):
            raise corrupt(self.path, "the JSON has the wrong shape: " + "; ".join(problems))
        return doc, data

    # -- writing ------------------------------------------------------------------------------------------------

    def write(self, doc: Any) -> None:
        """Replace the file with *doc*, durably and atomically.  The caller holds the lock.

        Raises WriteFailed; its ``applied`` is False when the failure came before the replace.
        """
        self.write_bytes(dumps(doc))

    def write_bytes(self, data: bytes) -> None:
        directory = self.path.parent
        tmp = directory / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        replaced = False
        try:
            crash_point("before_temp_write", self.path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                crash_point("after_temp_write", self.path)
                os.fsync(fd)
            finally:
                os.close(fd)
            crash_point("after_fsync", self.path)
            tmp.replace(self.path)
            replaced = True
            crash_point("after_rename", self.path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            if not replaced:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise WriteFailed(
                f"writing {self.path} failed: {exc.strerror or exc}. "
                + ("The registry is unchanged." if not replaced else "The new content is in place but may not be"
                                                                      " durable."),
                path=str(self.path), errno=exc.errno, applied=None if replaced else False) from exc
        io_stats.writes += 1
        io_stats.bytes_written += len(data)
        self._write_backup(data)

    def _write_backup(self, data: bytes) -> None:
        """Copy the committed bytes over ``<file>.bak``: best effort, so a failure here fails nothing."""
        with contextlib.suppress(OSError):
            fd = os.open(backup_path(self.path), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def transaction(self, timeout: float | None = None,
                    default: Callable[[], Any] | None = None) -> Iterator[Any]:
        """Lock, read, yield the document, and write it back atomically if the block changed it.

        Nothing is written when the block raises.  A missing file raises FileNotFoundError unless *default* makes
        a new document.
        """
        with self.locked(timeout):
            before: bytes | None
            try:
                doc, before = self._load()
            except FileNotFoundError:
                if default is None:
                    raise
                doc, before = default(), None
            yield doc
            data = dumps(doc)
            if data != before:
                self.write_bytes(data)
