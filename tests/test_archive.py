"""Issue 14: the global registry moves terminal agents to its archive, so its size does not grow with history.

What must hold: ``GLOBAL_REGISTRY.json`` names every task and every active agent and at most ``archive_after``
terminal agents; the global registry as read (``read_global``, ``check``, the harness) is the whole of it, exactly
as before; crashes, torn appends, corrupt lines, strays and wrong bookkeeping are found by ``check`` and fixed by
``repair``; a deploy never reuses an archived agent's id.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from registry import Registry, archive, check, model, ops, repair
from registry.errors import CorruptRegistry
from registry.model import GLOBAL_DIR, GLOBAL_FILE
from registry.store import set_crash_hook

KEEP = 3


@pytest.fixture
def areg(reg: Registry) -> Registry:
    reg.archive_after = KEEP
    return reg


def _global_path(reg: Registry) -> Path:
    return reg.base / GLOBAL_DIR / GLOBAL_FILE


def _hot(reg: Registry) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_global_path(reg).read_text())
    return doc


def _problems(base: Path) -> list[Any]:
    """check's findings, but the sessions of finished agents (the test agents run ``sleep`` and are never killed)."""
    return [f for f in check(base).findings if f.kind != "leak"]


def _run_agents(reg: Registry, tasks: int = 2, per_task: int = 5, keep_active: int = 1) -> dict[str, list[str]]:
    """Tasks each with *per_task* agents, all but *keep_active* of them finished (completed or failed)."""
    made: dict[str, list[str]] = {}
    for t in range(tasks):
        task = reg.create_task(f"history {t}", max_agents=50, max_concurrent=50)
        made[task] = []
        for i in range(per_task):
            agent = reg.deploy(task, f"worker{i}")["id"]
            made[task].append(agent)
            if i >= keep_active:
                reg.update(task, agent, "completed" if i % 2 else "failed", progress=100)
    return made


def test_the_global_file_keeps_every_task_every_active_agent_and_few_terminal_ones(areg: Registry) -> None:
    made = _run_agents(areg, tasks=3, per_task=6)
    hot = _hot(areg)
    tasks = {t: areg.read_task(t) for t in made}
    active = {a["id"] for t in tasks.values() for a in t["agents"] if model.is_active(a)}
    assert set(hot["tasks"]) == set(made)
    assert active <= set(hot["agents"])
    assert len(archive.terminal_ids(hot)) <= KEEP
    assert (hot["total_agents_spawned"], hot["active_agents"], hot["total_tasks"]) == (18, 3, 3)
    assert hot["archived_agents"] == 18 - len(hot["agents"]) > 0
    # Read through the registry, it is the global registry of old: every agent, no bookkeeping keys.
    full = areg.read_global()
    assert not model.global_violations(full, tasks)
    assert "archived_agents" not in full
    assert all("archived_agents" not in e for e in full["tasks"].values())
    assert not _problems(areg.base), check(areg.base).render()
    assert areg.global_file.read() == full  # what pytest_orch.chaos reads


def test_an_archived_agent_is_not_added_back_by_later_writes_of_its_task(areg: Registry) -> None:
    made = _run_agents(areg, tasks=1, per_task=8)
    task = next(iter(made))
    before = _hot(areg)["archived_agents"]
    areg.update(task, made[task][0], "blocked")
    assert _hot(areg)["archived_agents"] == before
    assert len(archive.terminal_ids(_hot(areg))) <= KEEP
    assert areg.heal() == []


def test_heal_adds_back_an_agent_the_global_registry_lost_but_not_the_archived_ones(areg: Registry) -> None:
    made = _run_agents(areg, tasks=1, per_task=8)
    task = next(iter(made))
    hot = _hot(areg)
    lost = next(a for a in hot["agents"])
    del hot["agents"][lost]
    _global_path(areg).write_text(json.dumps(hot, indent=2))
    assert _problems(areg.base)
    assert Registry(areg.base, heal=False).heal() == [task]
    assert not _problems(areg.base), check(areg.base).render()
    assert lost in _hot(areg)["agents"]


def test_a_deploy_never_reuses_an_archived_id(areg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    made = _run_agents(areg, tasks=1, per_task=6)
    task = next(iter(made))
    hot_ids = set(_hot(areg)["agents"])
    archived = [a for a in made[task] if a not in hot_ids]
    assert archived
    prefix = archived[0].rsplit("-", 2)[0]
    # Ids of this second and the next two minutes, with the random part the next deploy draws first, are archived.
    now = datetime.now()
    seconds = now.hour * 3600 + now.minute * 60 + now.second
    with archive.ids_path(_global_path(areg)).open("a") as fh:
        for s in range(seconds, seconds + 120):
            fh.write(f"{prefix}-{s // 3600 % 24:02d}{s // 60 % 60:02d}{s % 60:02d}-aaaaaa\n")

    class Hex:
        values = ["aaaaaa"] * 3 + ["bbbbbb"]

        def token_hex(self, n: int) -> str:
            return self.values.pop(0) if self.values else os.urandom(n).hex()

    monkeypatch.setattr(ops, "secrets", Hex())
    agent = areg.deploy(task, prefix)
    assert agent["id"].endswith("-bbbbbb"), "the id was not checked against the archive"


def test_a_torn_last_line_is_ignored_and_cut_off_by_the_next_append(areg: Registry) -> None:
    made = _run_agents(areg, tasks=1, per_task=5)
    task = next(iter(made))
    path = archive.archive_path(_global_path(areg))
    with path.open("ab") as fh:
        fh.write(b'{"id":"torn-000000-abcdef","task_id":"TASK-x","sta')
    assert not _problems(areg.base), check(areg.base).render()
    for i in range(5, 9):
        agent = areg.deploy(task, f"later{i}")["id"]
        areg.update(task, agent, "completed")
    assert b"torn-000000" not in path.read_bytes()
    assert path.read_bytes().endswith(b"\n")
    assert not _problems(areg.base), check(areg.base).render()


def test_a_crash_after_the_append_leaves_agents_in_both_and_the_next_write_finishes(areg: Registry) -> None:
    made = _run_agents(areg, tasks=1, per_task=4)  # 3 terminal: at KEEP, nothing archived yet
    task = next(iter(made))
    assert not archive.archive_path(_global_path(areg)).exists()

    class Crash(BaseException):
        pass

    def hook(point: str, path: Path) -> None:
        if point == "after_archive_append":
            raise Crash

    old = set_crash_hook(hook)
    try:
        agent = areg.deploy(task, "fourth")["id"]
        with pytest.raises(Crash):
            areg.update(task, agent, "completed")
    finally:
        set_crash_hook(old)
    entries = archive.read_entries(_global_path(areg))
    assert set(entries) <= set(_hot(areg)["agents"])  # in both: one agent each
    opened = Registry(areg.base)
    opened.archive_after = KEEP
    assert not _problems(areg.base), check(areg.base).render()
    other = opened.deploy(task, "fifth")["id"]
    opened.update(task, other, "completed")
    assert not _problems(areg.base), check(areg.base).render()
    assert not model.global_violations(opened.read_global(), {task: opened.read_task(task)})


def test_a_corrupt_line_is_a_corrupt_registry_and_repair_restore_rebuilds_it_whole(areg: Registry) -> None:
    made = _run_agents(areg, tasks=2, per_task=5)
    path = archive.archive_path(_global_path(areg))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"id": "x", "id": "y", "task_id": "T"}\n' + b"".join(lines[1:]))
    with pytest.raises(CorruptRegistry, match="GLOBAL_ARCHIVE"):
        areg.read_global()
    assert [f.kind for f in _problems(areg.base)] == ["corrupt"], check(areg.base).render()
    repair(areg.base, dry_run=False, restore=True)
    assert not path.exists()
    assert not _problems(areg.base), check(areg.base).render()
    assert len(_hot(areg)["agents"]) == sum(len(v) for v in made.values())


def test_wrong_bookkeeping_is_found_and_repaired(areg: Registry) -> None:
    _run_agents(areg, tasks=2, per_task=5)
    hot = _hot(areg)
    hot["archived_agents"] += 1
    _global_path(areg).write_text(json.dumps(hot, indent=2))
    report = check(areg.base)
    assert "archive_drift" in {f.kind for f in report.findings}, report.render()
    repaired = repair(areg.base, dry_run=False)
    assert any("archive" in a for a in repaired.actions), repaired.render()
    assert not _problems(areg.base), check(areg.base).render()


def test_an_archive_that_is_a_symlink_is_never_followed_and_blocks_no_write(areg: Registry, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious\n")
    areg.create_task("makes the global registry's directory")
    archive.archive_path(_global_path(areg)).symlink_to(target)
    made = _run_agents(areg, tasks=1, per_task=6)
    assert target.read_bytes() == b"precious\n"
    assert len(_hot(areg)["agents"]) == 6  # nothing could be archived: the global registry only stays bigger
    report = check(areg.base)
    assert "stray" in {f.kind for f in report.findings}, report.render()
    assert made


def test_archiving_off_keeps_every_agent_in_the_global_file(reg: Registry) -> None:
    reg.archive_after = None
    _run_agents(reg, tasks=1, per_task=6)
    assert len(_hot(reg)["agents"]) == 6
    assert not archive.archive_path(_global_path(reg)).exists()


def test_an_archive_line_in_another_form_is_read_and_checked(areg: Registry) -> None:
    _run_agents(areg, tasks=1, per_task=5)
    path = archive.archive_path(_global_path(areg))
    entries = archive.read_entries(_global_path(areg))
    path.write_bytes(b"".join(archive.dumps_line({"id": a, **v}).replace(b",", b", ") for a, v in entries.items()))
    assert archive.read_entries(_global_path(areg)) == entries


def test_orch_archive_after_sets_the_bound_and_a_bad_value_is_invalid(base: Path, tmux: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from registry.errors import InvalidArgument

    monkeypatch.setenv("ORCH_ARCHIVE_AFTER", "0")
    assert Registry(base).archive_after == 0
    monkeypatch.setenv("ORCH_ARCHIVE_AFTER", "none")
    assert Registry(base).archive_after is None
    monkeypatch.setenv("ORCH_ARCHIVE_AFTER", "-3")
    with pytest.raises(InvalidArgument, match="ORCH_ARCHIVE_AFTER"):
        Registry(base)
