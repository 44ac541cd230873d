"""The locked, crash-safe JSON file: transactions, the lock, torn reads, corrupt files, a full disk, crashes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from helpers_registry import LockHolder, run_in_child, spawn

from registry import CorruptRegistry, LockTimeout, RegistryError, WriteFailed
from registry.model import task_shape_problems
from registry.store import ARCHIVE_CRASH_POINTS, CRASH_POINTS, DIR_CRASH_POINTS, JsonFile, backup_path, set_crash_hook


@pytest.fixture
def doc_file(tmp_path: Path) -> JsonFile:
    file = JsonFile(tmp_path / "doc.json")
    with file.transaction(default=dict) as doc:
        doc["version"] = 1
    return file


@pytest.fixture
def no_crash_hook() -> Any:
    yield
    set_crash_hook(None)


def test_a_transaction_writes_the_changed_document(doc_file: JsonFile) -> None:
    with doc_file.transaction() as doc:
        doc["version"] = 2
        doc["note"] = "écrit"
    assert json.loads(doc_file.path.read_text()) == {"version": 2, "note": "écrit"}


def _change_then_fail(file: JsonFile) -> None:
    with file.transaction() as doc:
        doc["version"] = 99
        raise KeyError("the caller changed its mind")


def test_nothing_is_written_when_the_block_raises(doc_file: JsonFile) -> None:
    before = doc_file.path.read_bytes(), doc_file.path.stat().st_mtime_ns
    with pytest.raises(KeyError):
        _change_then_fail(doc_file)
    assert (doc_file.path.read_bytes(), doc_file.path.stat().st_mtime_ns) == before


def test_a_transaction_that_changes_nothing_does_not_rewrite_the_file(doc_file: JsonFile) -> None:
    before = doc_file.path.stat()
    with doc_file.transaction() as doc:
        assert doc == {"version": 1}
    after = doc_file.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_write_replaces_the_file_and_leaves_no_temp_file(doc_file: JsonFile) -> None:
    inode = doc_file.path.stat().st_ino
    with doc_file.transaction() as doc:
        doc["version"] = 2
    assert doc_file.path.stat().st_ino != inode, "the file was rewritten in place, not replaced"
    assert sorted(p.name for p in doc_file.path.parent.iterdir()) == ["doc.json", "doc.json.bak", "doc.json.lock"]


def test_the_backup_holds_the_bytes_of_the_last_committed_write(doc_file: JsonFile) -> None:
    assert backup_path(doc_file.path).read_bytes() == doc_file.path.read_bytes()
    with doc_file.transaction() as doc:
        doc["version"] = 2
    assert json.loads(backup_path(doc_file.path).read_bytes()) == {"version": 2}
    doc_file.path.write_bytes(b"garbage from an unlocked writer")
    assert json.loads(backup_path(doc_file.path).read_bytes()) == {"version": 2}


def test_the_lock_file_exists_after_and_is_never_unlinked(doc_file: JsonFile) -> None:
    assert doc_file.lock_path == doc_file.path.with_name("doc.json.lock")
    inode = doc_file.lock_path.stat().st_ino
    for version in range(2, 6):
        with doc_file.transaction() as doc:
            doc["version"] = version
        assert doc_file.lock_path.stat().st_ino == inode
    assert not doc_file._lock.is_locked


def test_a_missing_file_raises_unless_a_default_makes_one(tmp_path: Path) -> None:
    file = JsonFile(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError), file.transaction():
        pass
    assert not file.path.exists()


def test_the_lock_held_by_another_process_raises_lock_timeout_and_writes_nothing(doc_file: JsonFile,
                                                                                  tmp_path: Path) -> None:
    before = doc_file.path.read_bytes()
    with LockHolder(doc_file.lock_path, tmp_path / "released") as holder:
        with pytest.raises(LockTimeout) as raised, doc_file.transaction(timeout=0.2) as doc:
            doc["version"] = 2
        assert not holder.marker.exists()
    assert isinstance(raised.value, TimeoutError)
    assert isinstance(raised.value, RegistryError)
    assert str(doc_file.path) in str(raised.value)
    assert raised.value.applied is False
    assert doc_file.path.read_bytes() == before


def test_timeout_zero_tries_once_and_does_not_wait_for_the_holder(doc_file: JsonFile, tmp_path: Path) -> None:
    with LockHolder(doc_file.lock_path, tmp_path / "released") as holder:
        timer = holder.release_later(1.0)
        try:
            with pytest.raises(LockTimeout), doc_file.locked(timeout=0):
                pass
            assert not holder.marker.exists(), "timeout 0 waited for the holder to let go"
        finally:
            timer.cancel()
    with doc_file.locked(timeout=0):  # free now: one try is enough
        pass


def test_a_negative_timeout_waits_for_the_holder_to_let_go(doc_file: JsonFile, tmp_path: Path) -> None:
    with LockHolder(doc_file.lock_path, tmp_path / "released") as holder:
        timer = holder.release_later(0.5)
        with doc_file.transaction(timeout=-1) as doc:
            assert holder.marker.exists(), "got the lock while another process still held it"
            doc["version"] = 2
        timer.join()
    assert json.loads(doc_file.path.read_bytes()) == {"version": 2}


def test_the_default_timeout_comes_from_the_file_and_waits_then_raises(tmp_path: Path) -> None:
    file = JsonFile(tmp_path / "doc.json", lock_timeout=0.3)
    with LockHolder(file.lock_path, tmp_path / "released") as holder:
        with pytest.raises(LockTimeout) as raised, file.locked():
            pass
        assert not holder.marker.exists()
    assert raised.value.timeout == 0.3


def _increment(path: str, times: int) -> int:
    file = JsonFile(Path(path))
    for _ in range(times):
        with file.transaction(timeout=-1) as doc:
            doc["n"] += 1
    return times


def test_transactions_in_many_processes_lose_no_increment(doc_file: JsonFile) -> None:
    with doc_file.transaction() as doc:
        doc["n"] = 0
    with spawn().Pool(4) as pool:
        done = pool.starmap(_increment, [(str(doc_file.path), 50)] * 4)
    assert json.loads(doc_file.path.read_bytes())["n"] == sum(done) == 200


def _rewrite_large(path: str, times: int) -> int:
    """Replace a ~600 KB document *times* times; each version is self-checking (every entry holds the version)."""
    file = JsonFile(Path(path))
    for version in range(1, times + 1):
        with file.transaction(default=dict) as doc:
            doc["version"] = version
            doc["entries"] = [{"version": version, "pad": "x" * 100} for _ in range(4000 + version % 7)]
    return times


def _read_until(path: str, stop: str) -> dict[str, int]:
    seen, torn, reads = set(), 0, 0
    while not Path(stop).exists() or reads == 0:
        with open(path, "rb") as fh:
            data = fh.read()
        reads += 1
        try:
            doc = json.loads(data)
        except ValueError:
            torn += 1
            continue
        if any(e["version"] != doc["version"] for e in doc["entries"]):
            torn += 1
        seen.add(doc["version"])
    return {"reads": reads, "torn": torn, "versions": len(seen)}


def test_readers_in_another_process_never_see_a_torn_file(tmp_path: Path) -> None:
    path, stop = tmp_path / "big.json", tmp_path / "stop"
    _rewrite_large(str(path), 1)
    ctx = spawn()
    with ctx.Pool(2) as pool:
        reader = pool.apply_async(_read_until, (str(path), str(stop)))
        writer = pool.apply_async(_rewrite_large, (str(path), 60))
        try:
            assert writer.get(timeout=120) == 60
        finally:
            stop.touch()
        seen = reader.get(timeout=120)
    assert seen["torn"] == 0
    assert seen["versions"] >= 2, f"the reader never overlapped the writer ({seen}); the test proved nothing"


# Damaged files, with where the damage is (line, column), known by construction.
CORRUPTIONS = {
    "truncated": (b'{\n  "version": 2,\n  "entries": [\n    1,\n', 5, 1),
    "invalid UTF-8": (b'{\n  "version": 2,\n  "na\xffme": 1\n}\n', 3, 6),
    "zero bytes": (b"", 1, 1),
    "NUL bytes": (b"\0" * 64, 1, 1),
    "trailing garbage": (b'{\n  "version": 2\n}\n}\n', 4, 1),
    "a torn write": (b'{\n  "version": 2,\n  "entries": [1, 2\0\0\0\0', 3, 19),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_json_names_the_file_line_column_and_backup_and_is_left_untouched(tmp_path: Path, kind: str) -> None:
    file = JsonFile(tmp_path / "doc.json")
    with file.transaction(default=dict) as doc:
        doc.update(version=1, entries=list(range(3)))
    with file.transaction() as doc:
        doc["version"] = 2  # now a backup exists
    bad, line, column = CORRUPTIONS[kind]
    file.path.write_bytes(bad)

    with pytest.raises(CorruptRegistry) as raised, file.transaction() as doc:
        doc["version"] = 3
    error = raised.value
    assert isinstance(error, ValueError)
    assert (error.path, error.line, error.column) == (str(file.path), line, column)
    assert error.backup == str(backup_path(file.path))
    message = str(error)
    assert str(file.path) in message
    assert f"line {line} column {column}" in message
    assert str(backup_path(file.path)) in message
    assert "repair --restore" in message
    assert file.path.read_bytes() == bad


@pytest.mark.parametrize(("content", "problem"), [
    (b"[]", "JSON list, not an object"),
    (b'{"task_id": "T-1"}', "'agents' is missing"),
    (b'{"task_id": "T-1", "agents": [1, 2]}', "not an object with a string 'id'"),
    (b'{"agents": []}', "'task_id' is missing"),
])
def test_json_of_the_wrong_shape_is_corrupt_and_left_untouched(tmp_path: Path, content: bytes, problem: str) -> None:
    file = JsonFile(tmp_path / "AGENT_REGISTRY.json", validate=task_shape_problems)
    file.path.write_bytes(content)
    with pytest.raises(CorruptRegistry) as raised, file.transaction():
        pass
    assert problem in str(raised.value)
    assert str(file.path) in str(raised.value)
    assert "no backup exists" in str(raised.value)
    assert raised.value.backup is None
    assert file.path.read_bytes() == content


def test_a_full_disk_before_the_temp_write_leaves_the_old_file_and_raises_write_failed(
        doc_file: JsonFile, no_crash_hook: None) -> None:
    before = doc_file.path.read_bytes()
    backup_before = backup_path(doc_file.path).read_bytes()

    def disk_full(point: str, path: Path) -> None:
        if point == "before_temp_write":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    set_crash_hook(disk_full)
    with pytest.raises(WriteFailed) as raised, doc_file.transaction() as doc:
        doc["version"] = 2
    assert raised.value.applied is False
    assert raised.value.errno == errno.ENOSPC
    assert isinstance(raised.value, OSError)
    assert "unchanged" in str(raised.value)
    assert doc_file.path.read_bytes() == before
    assert backup_path(doc_file.path).read_bytes() == backup_before, "an uncommitted change reached the backup"
    assert not list(doc_file.path.parent.glob("*.tmp"))
    assert not doc_file._lock.is_locked


def test_a_failure_after_the_rename_says_the_change_may_be_on_disk(doc_file: JsonFile, no_crash_hook: None) -> None:
    def fsync_fails(point: str, path: Path) -> None:
        if point == "after_rename":
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    set_crash_hook(fsync_fails)
    with pytest.raises(WriteFailed) as raised, doc_file.transaction() as doc:
        doc["version"] = 2
    assert raised.value.applied is None
    assert json.loads(doc_file.path.read_bytes())["version"] == 2


def _crash_in_write(path: str, point: str) -> None:
    def die(where: str, _: Path) -> None:
        if where == point:
            os._exit(17)

    set_crash_hook(die)
    with JsonFile(Path(path)).transaction() as doc:
        doc["version"] = 2
        doc["entries"] = [{"pad": "y" * 100} for _ in range(2000)]


@pytest.mark.parametrize("point", [p for p in CRASH_POINTS if p not in ("between_task_and_global", *DIR_CRASH_POINTS,
                                                                   *ARCHIVE_CRASH_POINTS)])
def test_a_crash_at_any_point_of_a_write_leaves_the_old_or_the_new_file_and_the_lock_free(
        doc_file: JsonFile, point: str) -> None:
    before = json.loads(doc_file.path.read_bytes())
    code, outcome = run_in_child(_crash_in_write, str(doc_file.path), point)
    assert (code, outcome) == (17, None)
    after = json.loads(doc_file.path.read_bytes())
    if point == "after_rename":
        assert after["version"] == 2
    else:
        assert after == before
    with doc_file.transaction(timeout=0) as doc:  # the dead process's lock died with it
        doc["version"] = 3
    assert json.loads(doc_file.path.read_bytes())["version"] == 3
