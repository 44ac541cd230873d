"""A lock holder that stalls inside the write protocol, past the others' lock timeout.

The holder is a real child process stopped by the crash hook while it holds the task lock (at a seeded point before
its rename); the others are a swarm of real processes whose registry waits 0.2 s for a lock.  They must fail with
LockTimeout, recorded as ``fail`` (not applied), never as corruption; and the registry must be whole once the holder
finishes, and also once it is SIGKILLed where it stands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_orch.chaos import STALL_POINTS, Chaos, ImpatientReference
from pytest_orch.history import History
from pytest_orch.swarm import Worker
from registry import Registry, check, repair


@pytest.mark.parametrize("ending", ["finishes", "is SIGKILLed"])
def test_a_lock_holder_stalled_past_the_others_timeout_makes_them_fail_with_lock_timeout_and_leaves_the_registry_whole(
        orch_workspace: Path, orch_registry: Any, orch_swarm: Any, orch_chaos: Chaos, ending: str) -> None:
    task = orch_registry.create_task("stalled holder", max_agents=20, max_concurrent=20, max_depth=3)
    agents = [orch_registry.deploy(task, f"a{i}") for i in range(5)]
    task_file = orch_workspace / task / "AGENT_REGISTRY.json"
    global_file = orch_workspace / "registry" / "GLOBAL_REGISTRY.json"
    before = task_file.read_bytes(), global_file.read_bytes()

    holder = orch_chaos.stall(orch_workspace, lambda w: w.registry.update(task, agents[0], "working", 77))
    assert holder.point in STALL_POINTS

    def work(w: Worker) -> None:
        impatient = ImpatientReference(w.workspace, lock_timeout=0.2)
        mine = w.shared["agents"][1 + w.process]
        for k in range(w.ops):
            w.call("update", lambda k=k: impatient.update(task, mine, "blocked", k), task_id=task,  # type: ignore[misc]
                   agent_id=mine,
                   status="blocked", progress=k)

    history: History = orch_swarm(work, tasks=[task], concurrency=4, ops=3, shared={"agents": agents},
                                  during=lambda handle: None)  # no random kills: this test's fault is the stall
    assert len(history.calls) == 12
    for op in history.calls:
        assert op.outcome == "fail", op
        assert (op.error or "").startswith("LockTimeout: could not lock"), op.error
    assert (task_file.read_bytes(), global_file.read_bytes()) == before, "something was written under the stall"

    if ending == "finishes":
        assert holder.finish() == 0
    else:
        assert holder.sigkill() == -9
        assert (task_file.read_bytes(), global_file.read_bytes()) == before
    merged = orch_chaos.merge(history)
    report = orch_swarm.check(merged, reopen=True)  # every invariant; the holder's update is there if it was ok

    (held,) = [op for op in merged.calls if op.process == holder.process]
    agent = next(a for a in Registry(orch_workspace).read_task(task)["agents"] if a["id"] == agents[0])
    if ending == "finishes":
        assert held.outcome == "ok"
        assert (agent["status"], agent["progress"]) == ("working", 77)
    else:
        assert held.outcome == "info"
        assert (agent["status"], agent["progress"]) == ("running", 0)
    # Nobody holds the lock now: an operation that will not wait at all goes through.
    Registry(orch_workspace, lock_timeout=0).update(task, agents[1], "working", progress=5)

    faults = "\n".join(report.faults())
    assert f"stall_lock(process={holder.process}, point={holder.point}, file=task registry) by harness" in faults
    if ending == "is SIGKILLed":
        assert f"SIGKILL p{holder.process}: cut short update(agent_id={agents[0]}, status=working, progress=77)" \
               in faults


def test_repair_removes_the_temp_file_of_a_writer_killed_mid_write(orch_workspace: Path, orch_registry: Any,
                                                                   orch_chaos: Chaos) -> None:
    task = orch_registry.create_task("dead writer", max_agents=5, max_concurrent=5, max_depth=3)
    agent = orch_registry.deploy(task, "alpha")
    holder = orch_chaos.stall(orch_workspace, lambda w: w.registry.update(task, agent, "working", 10),
                              at="after_temp_write")
    assert holder.sigkill() == -9
    assert list(orch_workspace.rglob("*.tmp")), "the dead writer left no temp file"
    assert [f.kind for f in check(orch_workspace).findings] == ["stale_temp"]
    repair(orch_workspace, dry_run=False)
    assert not list(orch_workspace.rglob("*.tmp")), "the dead writer's temp file outlived the repair"
