"""The legacy baseline does what the old code did, faults included, so that what is measured against it is honest."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers_registry import count_opens, fake_tmux, spawn, tmux_cli

from registry import Registry, TmuxSessions, global_violations, task_violations
from registry.legacy import LegacyRegistry
from registry.model import GLOBAL_DIR, GLOBAL_FILE, TASK_FILE


@pytest.fixture
def legacy(base: Path, tmux: TmuxSessions) -> LegacyRegistry:
    return LegacyRegistry(base)


@pytest.fixture
def task(legacy: LegacyRegistry) -> str:
    return legacy.create_task("the old way", max_agents=10, max_concurrent=5)


@pytest.mark.parametrize("under", ["orchestrator", "a parent"])
def test_legacy_deploy_reads_the_task_registry_four_times_and_the_global_once(
        legacy: LegacyRegistry, task: str, under: str) -> None:
    parent = legacy.deploy(task, "lead")["id"] if under == "a parent" else "orchestrator"
    with count_opens(task=legacy.task_path(task), glob=legacy.global_path) as counts:
        legacy.deploy(task, "counted", parent=parent)
    assert counts.reads == {"task": 4, "glob": 1}
    assert counts.writes == {"task": 1, "glob": 1}


def test_legacy_writes_in_place_where_the_reference_replaces(legacy: LegacyRegistry, task: str, base: Path,
                                                             tmux: TmuxSessions) -> None:
    path = legacy.task_path(task)
    inode = path.stat().st_ino
    legacy.deploy(task, "in-place")
    assert path.stat().st_ino == inode
    assert not list(path.parent.glob("*.lock")), "the legacy registry took a lock"
    Registry(base).deploy(task, "replaced")
    assert path.stat().st_ino != inode


def test_legacy_ids_are_type_time_and_six_hex_digits(legacy: LegacyRegistry, task: str) -> None:
    agent = legacy.deploy(task, "investigator")
    assert re.fullmatch(r"investigator-\d{6}-[0-9a-f]{6}", agent["id"])


def test_legacy_run_serially_keeps_every_invariant(legacy: LegacyRegistry, task: str, base: Path) -> None:
    lead = legacy.deploy(task, "lead")
    helper = legacy.deploy(task, "helper", parent=lead["id"])
    legacy.update(task, lead["id"], "working", "busy", 20)
    legacy.update(task, helper["id"], "completed", "done", 100)
    legacy.kill(task, lead["id"], "enough")
    doc = legacy.read_task(task)
    assert [a["status"] for a in doc["agents"]] == ["terminated", "completed"]
    assert helper["depth"] == 2
    assert task_violations(doc) == []
    assert global_violations(legacy.read_global(), {task: doc}) == []


def test_legacy_has_no_deduplication(legacy: LegacyRegistry, task: str) -> None:
    legacy.deploy(task, "twin")
    legacy.deploy(task, "twin")
    assert [a["type"] for a in legacy.read_task(task)["agents"]] == ["twin", "twin"]


def test_legacy_reconcile_takes_a_failed_tmux_query_as_proof_that_every_session_is_gone(
        legacy: LegacyRegistry, task: str, base: Path, tmp_path: Path) -> None:
    agents = [legacy.deploy(task, kind) for kind in ("a", "b")]
    blind = LegacyRegistry(base, sessions=TmuxSessions(tmux_bin=fake_tmux(tmp_path, stderr="lost", code=1)))
    assert sorted(blind.reconcile(task)) == sorted(a["id"] for a in agents)  # the old bug, kept on purpose
    alive = {s for s in TmuxSessions().alive() if s.startswith("agent_")}
    assert alive == {a["tmux_session"] for a in agents}, "live agents were reaped"


def test_legacy_reconcile_reaps_a_session_killed_behind_its_back(legacy: LegacyRegistry, task: str) -> None:
    gone, kept = legacy.deploy(task, "gone"), legacy.deploy(task, "kept")
    tmux_cli("kill-session", "-t", gone["tmux_session"])
    assert legacy.reconcile(task) == [gone["id"]]
    assert [a["status"] for a in legacy.read_task(task)["agents"]] == ["terminated", "running"]
    assert kept["tmux_session"] in TmuxSessions().alive()


def _rewrite_in_place(path: str, times: int) -> int:
    from registry import legacy

    for version in range(times):
        legacy._save(Path(path), {"version": version, "entries": [{"pad": "x" * 100}] * 3000})
    return times


def _read_until_done(path: str, stop: str) -> dict[str, int]:
    torn = reads = 0
    while not Path(stop).exists() or reads == 0:
        reads += 1
        try:
            json.loads(Path(path).read_bytes())
        except ValueError:
            torn += 1
    return {"reads": reads, "torn": torn}


def test_legacy_in_place_writes_let_a_reader_see_a_torn_file(tmp_path: Path) -> None:
    path, stop = tmp_path / "legacy.json", tmp_path / "stop"
    _rewrite_in_place(str(path), 1)
    seen: dict[str, Any] = {}
    with spawn().Pool(2) as pool:
        for _ in range(3):  # a torn read is all but certain each time; three tries make it never flake
            stop.unlink(missing_ok=True)
            reader = pool.apply_async(_read_until_done, (str(path), str(stop)))
            try:
                pool.apply(_rewrite_in_place, (str(path), 100))
            finally:
                stop.touch()
            seen = reader.get(timeout=120)
            if seen["torn"]:
                break
    assert seen["torn"] > 0, f"no torn read in {seen['reads']} reads: the baseline no longer writes in place"


def test_the_reference_reads_what_the_legacy_wrote(legacy: LegacyRegistry, task: str, base: Path) -> None:
    agent = legacy.deploy(task, "old")
    reg = Registry(base)
    assert reg.read_task(task)["agents"][0]["id"] == agent["id"]
    reg.update(task, agent["id"], "completed")
    doc = json.loads((base / task / TASK_FILE).read_bytes())
    assert (doc["active_count"], doc["completed_count"]) == (0, 1)
    assert json.loads((base / GLOBAL_DIR / GLOBAL_FILE).read_bytes())["agents"][agent["id"]]["status"] == "completed"
