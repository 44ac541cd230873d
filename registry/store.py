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

Nothing here follows a symlink.  The file, its temp file, its backup and its lock are opened through a descriptor
of their directory, itself opened with ``O_NOFOLLOW``, and the file must be a regular one: a symlink or a stray where
any of them belongs is refused with :class:`~registry.errors.UnsafePath` (a backup that cannot be written is skipped,
as any failure of the best-effort copy is), so a link planted in a workspace never gets registry JSON written through
it.  Every read parses and checks the document (see :func:`parse`); a document that fails is never written back.

New directories are made durable before they are used: :func:`make_dirs` fsyncs the parent of each one it creates,
so a task whose creation was acknowledged cannot vanish on power loss with its directory entry.

Chaos tests need to stop a process at precise points of this protocol; :func:`set_crash_hook` installs a callable
that is told each point as it is passed.  Unused, a point costs one test of a module global.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from . import groupcommit
from .errors import CorruptRegistry, InvalidArgument, LockTimeout, UnsafePath, WriteFailed
from .locking import FlockLock, LockBusy

#: Seconds to wait for a lock when the caller does not say.  ``ORCH_LOCK_TIMEOUT`` overrides it (read at each use).
DEFAULT_LOCK_TIMEOUT = 30.0


def default_lock_timeout() -> float:
    """``ORCH_LOCK_TIMEOUT`` if set, else DEFAULT_LOCK_TIMEOUT.  InvalidArgument unless it is a finite number >= 0."""
    raw = os.environ.get("ORCH_LOCK_TIMEOUT")
    if raw is None or not raw.strip():
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"ORCH_LOCK_TIMEOUT is {raw!r}; it must be a finite number of seconds >= 0 (unset it"
                              f" for the default of {DEFAULT_LOCK_TIMEOUT:g})", name="ORCH_LOCK_TIMEOUT", value=raw)
    return value


def check_lock_timeout(value: object) -> float | None:
    """*value* if it is a lock timeout the store takes (None, or a finite number; < 0 waits forever)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"lock_timeout must be a finite number of seconds (< 0 waits forever), not {value!r}",
                              name="lock_timeout", value=value)
    return float(value)

#: Every point of the write protocol a crash hook is told about, in the order they are passed.
CRASH_POINTS = (
    "holding_lock",  # the lock was just acquired, nothing read yet
    "before_temp_write",  # the temp file is about to be created
    "after_temp_write",  # the new bytes are in the temp file, not yet fsynced
    "after_fsync",  # the temp file is durable, not yet renamed over the registry
    "after_rename",  # the registry was replaced, the directory not yet fsynced
    "between_task_and_global",  # (ops) the task registry is written, the global registry not yet
    "after_mkdir",  # (make_dirs) a directory was created, its parent not yet fsynced
    "after_archive_append",  # (archive) terminal agents are in the archive, the global registry still holds them
)
#: The points only an operation that creates a directory passes.
DIR_CRASH_POINTS = ("after_mkdir",)
#: The points only a write of the global registry that moves agents to its archive passes.
ARCHIVE_CRASH_POINTS = ("after_archive_append",)

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
        pass
    try:
        return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False).encode()
    except RecursionError:
        raise InvalidArgument("the document is nested too deeply to be written; nothing was written",
                              applied=False) from None
    except UnicodeEncodeError:  # a lone surrogate, which json.loads accepts: keep it as an escape
        return json.dumps(doc, indent=2, allow_nan=False).encode()


class _Refused(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"the key {key!r} appears twice in one object (a reader keeps only one of the two,"
                               " so writing it back would lose the other)")
            seen.add(key)
    return doc


def _no_constant(name: str) -> Any:
    raise _Refused(f"it holds {name}, which is not a JSON number (a registry holds no NaN or Infinity)")


def parse(data: bytes, path: Path) -> Any:
    """Parse registry bytes, or raise CorruptRegistry naming the file, the line and column, and the backup.

    Refused as well: nesting deeper than orjson's 1,024 levels (never a RecursionError), NaN and Infinity, and a
    key twice in one object.  Bytes this store wrote (orjson's own indented form) are proven free of duplicate keys
    by serializing the document again, which costs a fraction of the parse; any other bytes go through
    ``json.loads`` with a check of every object.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise corrupt(path, "it is nested more than 1024 levels deep") from None
    else:
        if dumps(doc) == data:
            return doc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise corrupt(path, f"invalid UTF-8 at line {line} column {column}", line=line, column=column) from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Refused as exc:
        raise corrupt(path, exc.what) from None
    except RecursionError:
        raise corrupt(path, "it is nested too deeply to be read") from None
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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO must not hang a reader
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_BACKUP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def unsafe(path: Path, role: str) -> UnsafePath:
    """The error for *path*, where the registry keeps *role*, being a symlink or the wrong kind of file."""
    what = "a symlink" if path.is_symlink() else "a directory" if path.is_dir() else "not a regular file"
    if role.endswith("directory") and not path.is_symlink():
        what = "not a directory"
    return UnsafePath(f"{path} is {what}, where the registry keeps {role}. It was not followed and nothing was"
                      f" written; move it out of the way (`orch-registry check` lists every such path).",
                      path=str(path))


def open_dir(directory: Path) -> int:
    """A descriptor of *directory*, which must be a real directory, not a symlink to one.

    FileNotFoundError if it is missing; UnsafePath if it is a symlink or not a directory.
    """
    try:
        return os.open(directory, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise unsafe(directory, "a registry directory") from None
        raise


def check_dir(directory: Path) -> None:
    """FileNotFoundError if *directory* is missing; UnsafePath if it is a symlink or not a directory."""
    if not stat.S_ISDIR(os.lstat(directory).st_mode):
        raise unsafe(directory, "a registry directory")


def read_file(path: Path) -> bytes:
    """The bytes of the regular file *path*, following no symlink in its last two components.

    FileNotFoundError if it (or its directory) is missing; UnsafePath if either is a symlink or a stray.  The file is
    opened by its full path (so that audit hooks see which file is read) after a look at its directory.
    """
    check_dir(path.parent)
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise unsafe(path, "a registry file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise unsafe(path, "a registry file")
    with open(fd, "rb") as fh:
        return fh.read()


def make_dirs(directory: Path) -> None:
    """Create *directory* and its missing parents, each made durable (its parent fsynced) before the next.

    A directory that exists is left as it is; one that is a symlink or a stray is refused (UnsafePath).
    """
    missing = []
    path = directory
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            new.mkdir()
            crash_point("after_mkdir", new)
            fsync_dir(new.parent)
    os.close(open_dir(directory))


def fsync_dir(directory: Path) -> None:
    fd = open_dir(directory)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._lock_timeout = check_lock_timeout(lock_timeout)
        # A blocking flock with a timeout (see registry.locking for why not filelock's polling).  Each acquisition
        # has a descriptor of its own, so threads sharing this object exclude each other as processes do.
        self._lock = FlockLock(self.lock_path)
        # The last bytes this object wrote, or read and found sound: the same bytes read again are parsed without
        # the duplicate-key and shape checks (they passed them, or are this registry's own output).  That keeps a
        # read of the global registry, which names every task, from paying its checks on every write.
        self._trusted: bytes | None = None

    @property
    def lock_timeout(self) -> float:
        """The timeout given, else ``ORCH_LOCK_TIMEOUT`` (checked now: InvalidArgument), else the default."""
        return default_lock_timeout() if self._lock_timeout is None else self._lock_timeout

    # -- locking ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the exclusive lock.  ``timeout``: None for the default, < 0 waits forever, 0 tries once.

        Raises LockTimeout (a TimeoutError) when the lock cannot be had in time; never proceeds without it.
        """
        wait = self.lock_timeout if timeout is None else check_lock_timeout(timeout)
        assert wait is not None
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
            return read_file(self.path)
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
        data = read_file(self.path)
        io_stats.reads += 1
        io_stats.bytes_read += len(data)
        if data == self._trusted:
            return orjson.loads(data), data
        doc = parse(data, self.path)
        if self.validate is not None and (problems := self.validate(doc)):
            raise corrupt(self.path, "the JSON has the wrong shape: " + "; ".join(problems))
        self._trusted = data
        return doc, data

    # -- writing ------------------------------------------------------------------------------------------------

    def write(self, doc: Any) -> None:
        """Replace the file with *doc*, durably and atomically.  The caller holds the lock.

        Raises WriteFailed; its ``applied`` is False when the failure came before the replace.
        """
        self.write_bytes(dumps(doc))

    def write_bytes(self, data: bytes) -> None:
        try:
            dir_fd = open_dir(self.path.parent)
        except UnsafePath:
            raise
        except OSError as exc:
            raise self._failed(exc, replaced=False) from exc
        try:
            self._replace(dir_fd, data)
        finally:
            os.close(dir_fd)
        self._trusted = data
        self._write_backup(data)
        io_stats.writes += 1
        io_stats.bytes_written += len(data)

    def _replace(self, dir_fd: int, data: bytes) -> None:
        """Temp file, write, fsync, rename over the file, fsync the directory: all relative to *dir_fd*."""
        tmp = f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        replaced = False
        try:
            crash_point("before_temp_write", self.path)
            fd = os.open(tmp, _TEMP_FLAGS, 0o644, dir_fd=dir_fd)
            try:
                _write_all(fd, data)
                crash_point("after_temp_write", self.path)
                os.fsync(fd)
            finally:
                os.close(fd)
            crash_point("after_fsync", self.path)
            os.replace(tmp, self.path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            replaced = True
            crash_point("after_rename", self.path)
            os.fsync(dir_fd)
        except OSError as exc:
            if not replaced:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
            raise self._failed(exc, replaced) from exc

    def _failed(self, exc: OSError, replaced: bool) -> WriteFailed:
        return WriteFailed(
            f"writing {self.path} failed: {exc.strerror or exc}. "
            + ("The registry is unchanged." if not replaced else "The new content is in place but may not be"
                                                                  " durable."),
            path=str(self.path), errno=exc.errno, applied=None if replaced else False)

    def _write_backup(self, data: bytes) -> None:
        """Copy the committed bytes over ``<file>.bak``: best effort, so a failure here fails nothing.

        Never through a symlink (the directory was just opened without following one), and only over a regular
        file (``orch-registry check`` reports anything else).
        """
        with contextlib.suppress(OSError):
            fd = os.open(backup_path(self.path), _BACKUP_FLAGS, 0o644)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    _write_all(fd, data)
                    os.ftruncate(fd, len(data))
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def transaction(self, timeout: float | None = None,
                    default: Callable[[], Any] | None = None) -> Iterator[Any]:
        """Lock, read, yield the document, and write it back atomically if the block changed it.

        Nothing is written when the block raises, nor when it left the document as it read it (even if the file's
        bytes are not in this store's form).  A missing file raises FileNotFoundError unless *default* makes a new
        document.
        """
        with self.locked(timeout):
            before: bytes | None
            try:
                doc, before = self._load()
            except FileNotFoundError:
                if default is None:
                    raise
                doc, before = default(), None
            original = None if before is None else dumps(doc)
            yield doc
            data = dumps(doc)
            if data != original:
                self.write_bytes(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
