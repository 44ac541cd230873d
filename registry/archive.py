"""The archive of the global registry: terminal agents moved out of ``GLOBAL_REGISTRY.json`` so that its cost is flat.

Every deploy and every status change rewrites the global registry under the lock every task shares.  Were it to keep
every agent the workspace ever ran, that rewrite would grow with the workspace's history (issue 14: 241 ms a deploy
and 217 ms a status change at 50,000 agents, against 14 ms and 3 ms at 100).  So the global registry keeps

* every task (its entry never leaves),
* every active agent,
* at most :data:`ARCHIVE_AFTER` terminal agents: when a write would leave more, all of its terminal agents are
  appended to the archive first, then the global registry is written without them,

and the archive keeps the rest, append only:

* ``registry/GLOBAL_ARCHIVE.jsonl``: one line of compact JSON per archived agent, its global entry with its ``id``.
* ``registry/GLOBAL_ARCHIVE.ids``: the archived ids, one a line, so that a deploy checks a new id against every
  agent of the workspace by searching a few bytes a line, not by parsing the archive.

A terminal agent takes no more updates, so an archived entry never changes.  The global registry counts what it
moved: ``archived_agents`` (all of them; ``total_agents_spawned`` still counts every agent) and, in each task's
entry, ``archived_agents`` (that task's), which is how a re-sync of one task knows that the terminal agents the
global registry lacks were archived, without reading the archive.

Crash safety.  Both files are appended to and fsynced (ids first, then entries) before the global registry is
replaced without the entries, so a crash leaves each archived agent in the archive, in the global registry, or in
both; never in neither.  An entry in both is one agent (readers take the global registry's), and the next
compaction appends it again: duplicates are harmless, readers keep one per id.  A crash mid-append leaves a last
line without its newline: readers ignore it and the next append cuts it off first.  Any other line that does not
parse makes the archive corrupt (CorruptRegistry), as a corrupt registry file is.

Readers.  :func:`merge` folds the archive into the global document: :meth:`GlobalFile.read` (and so
``Registry.read_global``, ``orch-registry check``, the harness) sees exactly the global registry of old, every agent
in it, the bookkeeping keys removed.  A tool that ``json.load``-s ``GLOBAL_REGISTRY.json`` itself sees every task,
every active agent and the recently finished ones; the README says so.  ``orch-registry repair``, when it rewrites
the global registry, writes the whole of it and removes the archive (un-archiving everything; the next status change
archives again), so a damaged archive is always repairable from the task registries.

Nothing here follows a symlink: both files are opened with ``O_NOFOLLOW`` and must be regular files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from . import model
from .errors import CorruptRegistry, InvalidArgument, UnsafePath, WriteFailed
from .store import JsonFile, corrupt, crash_point, open_dir, parse, unsafe

#: Terminal agents the global registry keeps before it moves them all to the archive.  A class attribute of
#: Registry copies it, so that a test or a benchmark can change it for one registry.
ARCHIVE_AFTER = 256
#: What :func:`archive_after_from_env` returns when the variable is not set.
UNSET = -1


def archive_after_from_env() -> int | None:
    """``ORCH_ARCHIVE_AFTER`` (a whole number >= 0, or ``none`` to turn the archive off), else UNSET (-1).

    For running a suite with archiving on every status change (``0``) or off; InvalidArgument for anything else.
    """
    raw = os.environ.get("ORCH_ARCHIVE_AFTER", "").strip()
    if not raw:
        return UNSET
    if raw.lower() == "none":
        return None
    if raw.isdigit():
        return int(raw)
    raise InvalidArgument(f"ORCH_ARCHIVE_AFTER is {raw!r}; it must be a whole number >= 0, or none",
                          name="ORCH_ARCHIVE_AFTER", value=raw)


ARCHIVE_FILE = "GLOBAL_ARCHIVE.jsonl"
IDS_FILE = "GLOBAL_ARCHIVE.ids"
#: The keys the global document holds for the archive's bookkeeping; :func:`merge` removes them.
COUNT = "archived_agents"

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_APPEND_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def archive_path(global_path: Path) -> Path:
    return global_path.with_name(ARCHIVE_FILE)


def ids_path(global_path: Path) -> Path:
    return global_path.with_name(IDS_FILE)


def _read(path: Path) -> bytes:
    """The bytes of *path*, b"" if it is missing; UnsafePath if it is a symlink or not a regular file."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise unsafe(path, "the global registry's archive") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise unsafe(path, "the global registry's archive")
    with open(fd, "rb") as fh:
        return fh.read()


def _whole_lines(data: bytes) -> bytes:
    """*data* without a last line that lacks its newline (an append a crash cut short)."""
    return data[:data.rfind(b"\n") + 1]


def _parse_line(line: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        doc = orjson.loads(line)
        if orjson.dumps(doc) != line:  # not the form this module writes: check it as any registry file is checked
            doc = parse(line, path)
    except (orjson.JSONDecodeError, CorruptRegistry):
        raise corrupt(path, f"line {number} is not a JSON object") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not doc["id"]:
        raise corrupt(path, f"line {number} is not an archived agent (an object with a string 'id')")
    problems = model.global_shape_problems({"tasks": {}, "agents": {doc["id"]: doc}})
    if problems or not isinstance(doc.get("task_id"), str):
        raise corrupt(path, f"line {number} has the wrong shape: " + "; ".join(problems or ["no string 'task_id'"]))
    return doc


def read_entries(global_path: Path) -> dict[str, dict[str, Any]]:
    """Every archived entry by id (the last line of an id wins), without its ``id`` key.  {} without an archive.

    CorruptRegistry if a line (other than a cut-short last one) is not an archived entry; UnsafePath for a symlink.
    """
    path = archive_path(global_path)
    entries: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(_whole_lines(_read(path)).splitlines(), 1):
        doc = _parse_line(line, path, number)
        entries[doc.pop("id")] = doc
    return entries


def read_ids(global_path: Path) -> bytes:
    """The ids file's whole lines, with a newline in front: ``b"\\n" + id + b"\\n" in read_ids(p)`` tests an id."""
    return b"\n" + _whole_lines(_read(ids_path(global_path)))


def merge(hot: Mapping[str, Any], entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The global document as it would be with nothing archived: every agent in ``agents``, no bookkeeping keys.

    An agent in both *hot* and the archive (a crash between the append and the write) is *hot*'s.
    """
    doc = {k: v for k, v in hot.items() if k != COUNT}
    tasks = hot.get("tasks")
    if isinstance(tasks, dict):
        doc["tasks"] = {t: ({k: v for k, v in e.items() if k != COUNT} if isinstance(e, dict) else e)
                        for t, e in tasks.items()}
    agents = hot.get("agents")
    if entries and isinstance(agents, dict):
        merged = {a: dict(v) for a, v in entries.items() if a not in agents}
        merged.update(agents)
        doc["agents"] = merged
    return doc


def terminal_ids(glob: Mapping[str, Any]) -> list[str]:
    return [a for a, v in glob.get("agents", {}).items() if v.get("status") in model.TERMINAL]


def _append(path: Path, dir_fd: int, data: bytes) -> None:
    """Append *data* to *path* (opened relative to *dir_fd*, never through a symlink) and fsync it.

    A last line a crash cut short is cut off first, so that *data* starts a line of its own.
    """
    try:
        fd = os.open(path.name, _APPEND_FLAGS, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise unsafe(path, "the global registry's archive") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise unsafe(path, "the global registry's archive")
        end = os.lseek(fd, 0, os.SEEK_END)
        if end:
            tail = os.pread(fd, min(end, 1 << 16), max(0, end - (1 << 16)))
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                keep = end - len(tail) + cut + 1 if cut >= 0 else (0 if end <= 1 << 16 else None)
                if keep is None:  # a last line over 64 KB long was never written by this module
                    raise corrupt(path, "its last line is over 64 KB long and has no newline")
                os.ftruncate(fd, keep)
                end = keep
        view = memoryview(data)
        offset = end
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        os.fsync(fd)
    finally:
        os.close(fd)


def append(global_path: Path, entries: Iterable[tuple[str, Mapping[str, Any]]]) -> int:
    """Append *entries* (id, global entry) to the archive, durably: the ids file, then the entries.

    Returns how many.  The caller holds the global registry's lock and writes the global registry without them
    afterwards.  Raises WriteFailed (``applied`` False: the global registry is unchanged, and still holds them).
    """
    items = list(entries)
    if not items:
        return 0
    ids = b"".join(a.encode() + b"\n" for a, _ in items)
    lines = b"".join(orjson.dumps({"id": a, **v}) + b"\n" for a, v in items)
    try:
        dir_fd = open_dir(global_path.parent)
        try:
            _append(ids_path(global_path), dir_fd, ids)
            _append(archive_path(global_path), dir_fd, lines)
            os.fsync(dir_fd)  # the files may be new
        finally:
            os.close(dir_fd)
    except (UnsafePath, CorruptRegistry):
        raise
    except OSError as exc:
        raise WriteFailed(f"archiving {len(items)} agents to {archive_path(global_path)} failed: {exc.strerror or exc}."
                          " The global registry is unchanged and still holds them.", path=str(global_path),
                          errno=exc.errno, applied=False) from exc
    crash_point("after_archive_append", global_path)
    return len(items)


def compact(glob: dict[str, Any], global_path: Path, keep: int | None) -> int:
    """Move every terminal agent of *glob* to the archive if it holds more than *keep* of them (None: never).

    Appends them durably and removes them from *glob*, counting them in ``archived_agents`` (the document's and
    their task's); the caller then writes *glob*.  Returns how many moved.
    """
    if keep is None:
        return 0
    terminal = terminal_ids(glob)
    if len(terminal) <= keep:
        return 0
    agents = glob["agents"]
    append(global_path, ((a, agents[a]) for a in terminal))
    tasks = glob.get("tasks", {})
    for agent_id in terminal:
        entry = tasks.get(agents.pop(agent_id).get("task_id"))
        if isinstance(entry, dict):
            entry[COUNT] = entry.get(COUNT, 0) + 1
    glob[COUNT] = glob.get(COUNT, 0) + len(terminal)
    return len(terminal)


def remove(global_path: Path) -> list[Path]:
    """Remove the archive's files (after the global registry was written whole); return those removed."""
    removed = []
    dir_fd = open_dir(global_path.parent)
    try:
        for path in (archive_path(global_path), ids_path(global_path)):
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue  # a stray: check reports it, nothing here touches it
                os.unlink(path.name, dir_fd=dir_fd)
                removed.append(path)
        if removed:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return removed


def bookkeeping_problems(hot: Mapping[str, Any], entries: Mapping[str, Mapping[str, Any]],
                         ids: bytes) -> list[str]:
    """Where the global registry's counts of archived agents, or the ids file, disagree with the archive."""
    problems = []
    agents = hot.get("agents", {})
    only_archived = [a for a in entries if a not in agents]
    if hot.get(COUNT, 0) != len(only_archived):
        problems.append(f"the global registry counts {hot.get(COUNT, 0)!r} archived agents, the archive holds"
                        f" {len(only_archived)} that it does not")
    per_task: dict[Any, int] = {}
    for agent_id in only_archived:
        per_task[entries[agent_id].get("task_id")] = per_task.get(entries[agent_id].get("task_id"), 0) + 1
    for task_id, entry in hot.get("tasks", {}).items():
        if entry.get(COUNT, 0) != per_task.get(task_id, 0):
            problems.append(f"the global registry counts {entry.get(COUNT, 0)!r} archived agents of task {task_id},"
                            f" the archive holds {per_task.get(task_id, 0)}")
    active = sorted(a for a, v in entries.items() if v.get("status") not in model.TERMINAL)
    if active:
        problems.append(f"the archive holds agents that are not terminal: {', '.join(active[:5])}")
    missing = [a for a in entries if b"\n" + a.encode() + b"\n" not in ids]
    if missing:
        problems.append(f"{len(missing)} archived ids are missing from {IDS_FILE} (e.g. {missing[0]}), so a deploy"
                        " would not see them taken")
    return problems


def dumps_line(doc: Mapping[str, Any]) -> bytes:
    """One archive line (for tests that write archives by hand)."""
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


class GlobalFile(JsonFile):
    """The global registry's file.  :meth:`read` folds the archive in (:func:`merge`); :meth:`read_hot` does not.

    Writers read, change and write the file itself (``read_hot``, ``load``, ``transaction``); readers that want
    every agent the workspace ran call ``read``.
    """

    def read(self) -> Any:
        return merge(self.read_hot(), read_entries(self.path))

    def read_hot(self) -> Any:
        return super().read()

    def archived_ids(self) -> set[str]:
        return set(read_entries(self.path))
