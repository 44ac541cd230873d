"""Many real processes on one workspace: the reference loses nothing, the legacy baseline loses updates."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from helpers_registry import lost_updates, run_workload, spawn

from registry import Registry, TmuxSessions, check, global_violations, task_violations
from registry.legacy import LegacyRegistry

WORKERS = 10
ROUNDS = 6


def assert_every_invariant(reg: Registry, task_ids: list[str]) -> None:
    tasks = {t: reg.read_task(t) for t in task_ids}
    broken = [str(v) for t in tasks.values() for v in task_violations(t)]
    broken += [str(v) for v in global_violations(reg.read_global(), tasks)]
    assert broken == []


@pytest.mark.parametrize("n_tasks", [1, 3], ids=["one-task", "three-tasks"])
def test_ten_processes_deploying_updating_and_killing_lose_nothing_through_the_reference(
        base: Path, tmux: TmuxSessions, n_tasks: int) -> None:
    reg = Registry(base)
    task_ids = [reg.create_task(f"task {i}", max_agents=WORKERS * ROUNDS) for i in range(n_tasks)]

    reports = run_workload("reference", base, task_ids, WORKERS, ROUNDS)

    assert [e for r in reports for e in r["errors"]] == []
    assert [a for r in reports for a in r["reaped"]] == [], "reconcile reaped an agent whose session was alive"
    assert sum(len(r["deployed"]) for r in reports) == WORKERS * ROUNDS
    assert_every_invariant(reg, task_ids)
    assert lost_updates(reports, reg.read_task, reg.read_global, task_ids) == []
    report = check(base)
    assert report.healthy, report.render()
    still_active = sum(1 for r in reports for s in r["final"].values() if s in ("running", "working"))
    assert still_active == WORKERS // 2
    assert report.sessions == still_active


def test_the_same_workload_through_the_legacy_registry_loses_updates(base: Path, tmux: TmuxSessions) -> None:
    attempts = []
    for attempt in range(3):  # a loss is all but certain each time; three tries make the test never flake
        workspace = base / f"attempt-{attempt}"
        legacy = LegacyRegistry(workspace)
        task_ids = [legacy.create_task("one task, many writers", max_agents=WORKERS * ROUNDS,
                                       max_concurrent=WORKERS * ROUNDS)]
        reports = run_workload("legacy", workspace, task_ids, WORKERS, ROUNDS)
        problems = lost_updates(reports, legacy.read_task, legacy.read_global, task_ids)
        attempts.append(problems)
        if problems:
            break
    assert attempts[-1], "the legacy registry lost nothing in three concurrent runs: the baseline is not honest"
    acknowledged = sum(len(r["deployed"]) for r in reports)
    assert acknowledged > 0, "no legacy deploy was acknowledged at all, so nothing could be lost"


def _deploy_and_finish(reg: Registry, task_id: str, worker: int, out: list[str], errors: list[BaseException]) -> None:
    try:
        for _ in range(5):
            agent = reg.deploy(task_id, f"thread{worker}")
            reg.update(task_id, agent["id"], "completed", "done", 100)
            out.append(agent["id"])
    except BaseException as exc:
        errors.append(exc)


def test_threads_sharing_one_registry_object_lose_nothing(base: Path, tmux: TmuxSessions) -> None:
    reg = Registry(base)
    task_id = reg.create_task("threads", max_agents=100)
    ids: list[str] = []
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_deploy_and_finish, args=(reg, task_id, w, ids, errors)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    task = reg.read_task(task_id)
    assert sorted(a["id"] for a in task["agents"]) == sorted(ids)
    assert len(ids) == 20
    assert task["completed_count"] == 20
    assert_every_invariant(reg, [task_id])


def _create_tasks(base: str, n: int) -> list[str]:
    reg = Registry(base)
    return [reg.create_task(f"concurrent create {i}") for i in range(n)]


def test_tasks_created_concurrently_all_reach_the_global_registry(base: Path, tmux: TmuxSessions) -> None:
    ctx = spawn()
    with ctx.Pool(4) as pool:
        created = [t for batch in pool.starmap(_create_tasks, [(str(base), 5)] * 4) for t in batch]
    reg = Registry(base)
    assert sorted(created) == reg.task_ids()
    glob = reg.read_global()
    assert sorted(glob["tasks"]) == sorted(created)
    assert glob["total_tasks"] == 20
    assert_every_invariant(reg, created)


def _deploy_once(impl: str, base: str, task_id: str, kind: str, barrier: Any) -> bool:
    reg: Registry | LegacyRegistry = Registry(base) if impl == "reference" else LegacyRegistry(base)
    barrier.wait()
    try:
        reg.deploy(task_id, kind)
    except Exception:
        return False
    return True


def _deploy_together(impl: str, base: Path, task_id: str, n: int) -> int:
    ctx = spawn()
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            return sum(pool.starmap(_deploy_once, [(impl, str(base), task_id, f"kind{i}", barrier)
                                                    for i in range(n)]))


def test_deploys_racing_against_max_concurrent_never_exceed_it_through_the_reference(
        base: Path, tmux: TmuxSessions) -> None:
    reg = Registry(base)
    task_id = reg.create_task("two at once", max_concurrent=2)
    assert _deploy_together("reference", base, task_id, 6) == 2
    task = reg.read_task(task_id)
    assert task["active_count"] == 2
    assert task_violations(task) == []


def test_the_legacy_checks_limits_on_a_stale_read_and_exceeds_max_concurrent(base: Path,
                                                                             tmux: TmuxSessions) -> None:
    accepted = []
    for attempt in range(3):
        legacy = LegacyRegistry(base / f"attempt-{attempt}")
        task_id = legacy.create_task("two at once", max_concurrent=2)
        accepted.append(_deploy_together("legacy", legacy.base, task_id, 6))
        if accepted[-1] > 2:
            break
    assert max(accepted) > 2, f"the legacy registry accepted {accepted} deploys against max_concurrent 2"
