"""Statuses, names, the projection into the global registry, and the invariants: pure functions, and the samples."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from registry import ACTIVE, STATUSES, TERMINAL, InvalidName, Registry, global_violations, task_violations
from registry.model import (
    GLOBAL_DIR,
    GLOBAL_FILE,
    TASK_FILE,
    new_global_document,
    new_task_document,
    recompute_task_counters,
    sync_global,
    validate_name,
)

NOW = "2025-11-01T12:00:00"


def make_agent(agent_id: str, *, parent: str = "orchestrator", depth: int = 1, status: str = "running",
               kind: str | None = None) -> dict[str, Any]:
    return {"id": agent_id, "type": kind or agent_id.split("-")[0], "tmux_session": f"agent_{agent_id}",
            "parent": parent, "depth": depth, "status": status, "started_at": NOW, "progress": 0,
            "last_update": NOW, "prompt": ""}


def make_task(*agents: dict[str, Any], task_id: str = "TASK-1", **limits: int) -> dict[str, Any]:
    doc = new_task_document(task_id, "a task", priority="P1", max_agents=limits.get("max_agents", 45),
                            max_depth=limits.get("max_depth", 5), max_concurrent=limits.get("max_concurrent", 20),
                            workspace="/w/" + task_id, workspace_base="/w", client_cwd=None, now=NOW)
    doc["agents"] = list(agents)
    doc["agent_hierarchy"] = {"orchestrator": []}
    for agent in agents:
        doc["agent_hierarchy"].setdefault(agent["parent"], []).append(agent["id"])
    recompute_task_counters(doc)
    return doc


def rules(violations: list[Any]) -> list[str]:
    return sorted(v.rule for v in violations)


def test_the_statuses_are_the_documented_ones() -> None:
    assert frozenset({"running", "working", "blocked"}) == ACTIVE
    assert frozenset({"completed", "terminated", "error", "failed"}) == TERMINAL
    assert ACTIVE | TERMINAL == STATUSES
    assert not ACTIVE & TERMINAL


@pytest.mark.parametrize("name", ["TASK-20251017-213512-5169d812", "jsonl_architecture_planner", "a", "A9-_x",
                                  "x" * 64])
def test_safe_names_are_accepted(name: str) -> None:
    assert validate_name("task id", name) == name


@pytest.mark.parametrize("name", ["../x", "/", "a b", "a:b", ".", "..", "", "x" * 65, "-x", "_x", "a/b", "a\\b",
                                  "a\nb", "a\0b", "é", "a.b", 7, None], ids=repr)
def test_unsafe_names_are_refused_with_what_is_allowed(name: object) -> None:
    with pytest.raises(InvalidName) as raised:
        validate_name("agent type", name)
    assert "agent type" in str(raised.value)
    assert raised.value.value == name


def test_a_consistent_task_has_no_violations() -> None:
    lead = make_agent("lead-1")
    task = make_task(lead, make_agent("helper-1", parent="lead-1", depth=2, status="completed"))
    assert task_violations(task) == []
    assert (task["total_spawned"], task["active_count"], task["completed_count"]) == (2, 1, 1)


@pytest.mark.parametrize(("key", "value"), [("total_spawned", 3), ("active_count", 0), ("completed_count", 1)])
def test_counter_drift_is_a_violation(key: str, value: int) -> None:
    task = make_task(make_agent("a-1"), make_agent("b-1"))
    task[key] = value
    (violation,) = task_violations(task)
    assert violation.rule == "count_drift"
    assert key in violation.message
    assert violation.task_id == "TASK-1"


def test_a_duplicate_id_is_a_violation() -> None:
    task = make_task(make_agent("a-1"), make_agent("a-1", status="completed"))
    assert "duplicate_id" in rules(task_violations(task))


def test_a_parent_that_is_not_an_agent_of_the_task_breaks_the_hierarchy() -> None:
    task = make_task(make_agent("a-1", parent="ghost-1", depth=2))
    assert rules(task_violations(task)) == ["broken_hierarchy"]


def test_an_agent_hierarchy_that_disagrees_with_the_parents_is_a_violation() -> None:
    task = make_task(make_agent("a-1"), make_agent("b-1", parent="a-1", depth=2))
    task["agent_hierarchy"] = {"orchestrator": ["a-1", "b-1"]}
    (violation,) = task_violations(task)
    assert violation.rule == "broken_hierarchy"
    assert "('a-1', 'b-1')" in violation.message


@pytest.mark.parametrize("depth", [1, 3])
def test_a_depth_other_than_the_parent_depth_plus_one_is_a_violation(depth: int) -> None:
    task = make_task(make_agent("a-1"), make_agent("b-1", parent="a-1", depth=depth))
    assert rules(task_violations(task)) == ["wrong_depth"]


def test_an_agent_deeper_than_max_depth_is_a_violation() -> None:
    chain = [make_agent("a-1")] + [make_agent(f"a-{i}", parent=f"a-{i - 1}", depth=i) for i in range(2, 4)]
    assert rules(task_violations(make_task(*chain, max_depth=2))) == ["max_depth"]


def test_more_active_agents_than_max_concurrent_is_a_violation() -> None:
    task = make_task(make_agent("a-1"), make_agent("b-1"), make_agent("c-1", status="failed"), max_concurrent=1)
    assert rules(task_violations(task)) == ["max_concurrent"]


def test_more_agents_than_max_agents_is_a_violation() -> None:
    task = make_task(make_agent("a-1", status="completed"), make_agent("b-1", status="completed"), max_agents=1)
    assert rules(task_violations(task)) == ["max_agents"]


def test_an_unknown_status_is_a_violation() -> None:
    task = make_task(make_agent("a-1", status="sleeping"))
    assert "unknown_status" in rules(task_violations(task))


def global_of(*tasks: dict[str, Any]) -> dict[str, Any]:
    glob = new_global_document(NOW)
    for task in tasks:
        sync_global(glob, task, NOW)
    return glob


def test_the_projection_of_the_tasks_agrees_with_them() -> None:
    one = make_task(make_agent("a-1"), make_agent("b-1", status="completed"), task_id="T-1")
    two = make_task(make_agent("c-1", status="blocked"), task_id="T-2")
    glob = global_of(one, two)
    assert global_violations(glob, {"T-1": one, "T-2": two}) == []
    assert (glob["total_tasks"], glob["total_agents_spawned"], glob["active_agents"]) == (2, 3, 2)
    assert glob["agents"]["b-1"]["task_id"] == "T-1"


def test_the_global_registry_disagreeing_with_a_task_is_a_violation() -> None:
    task = make_task(make_agent("a-1"), make_agent("b-1"))
    glob = global_of(task)
    glob["agents"]["a-1"]["status"] = "completed"
    del glob["agents"]["b-1"]
    glob["agents"]["z-1"] = {"task_id": "TASK-1", "type": "z", "status": "running"}
    messages = [v.message for v in global_violations(glob, {"TASK-1": task})]
    assert any("a-1" in m and "status 'completed'" in m for m in messages)
    assert any("b-1" in m and "missing" in m for m in messages)
    assert any("z-1" in m and "lacks" in m for m in messages)
    assert {v.rule for v in global_violations(glob, {"TASK-1": task})} == {"global_divergence"}


def test_global_totals_that_are_not_the_sums_are_a_violation() -> None:
    task = make_task(make_agent("a-1"))
    glob = global_of(task)
    glob["active_agents"] = 5
    (violation,) = global_violations(glob, {"TASK-1": task})
    assert violation.rule == "global_count_drift"


def test_an_incomplete_comparison_ignores_tasks_it_was_not_given() -> None:
    one, two = make_task(make_agent("a-1"), task_id="T-1"), make_task(make_agent("b-1"), task_id="T-2")
    glob = global_of(one, two)
    assert global_violations(glob, {"T-1": one}, complete=False) == []
    assert global_violations(glob, {"T-1": one}) != []


def test_sync_global_changes_nothing_the_second_time_and_keeps_keys_it_does_not_know() -> None:
    task = make_task(make_agent("a-1"))
    glob = global_of(task)
    glob["agents"]["a-1"]["note"] = "kept"
    glob["custom"] = {"kept": True}
    before = copy.deepcopy(glob)
    assert sync_global(glob, task, "2030-01-01T00:00:00") is False
    assert glob == before


def test_sync_global_leaves_the_entries_of_unchanged_agents_alone() -> None:
    a, b = make_agent("a-1"), make_agent("b-1")
    task = make_task(a, b)
    glob = global_of(task)
    glob["agents"]["a-1"]["started_at"] = "recorded by someone else"
    a_entry = copy.deepcopy(glob["agents"]["a-1"])
    b["status"] = "completed"
    b["completed_at"] = "2030-01-01T00:00:00"
    recompute_task_counters(task)
    assert sync_global(glob, task, "2030-01-01T00:00:01") is True
    assert glob["agents"]["a-1"] == a_entry
    assert glob["agents"]["b-1"]["status"] == "completed"
    assert glob["agents"]["b-1"]["completed_at"] == "2030-01-01T00:00:00"
    assert glob["agents"]["b-1"]["last_update"] == "2030-01-01T00:00:01"
    assert glob["active_agents"] == 1


# --------------------------------------------------------------------------------------------------------------------
# The real registry files


def sample_tasks(samples: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_bytes()) for p in samples.glob(f"*/{TASK_FILE}")}


def test_every_sample_file_reads_through_the_reference_as_it_is(samples: Path) -> None:
    reg = Registry(samples, heal=False)
    expected = sample_tasks(samples)
    assert reg.task_ids() == sorted(expected)
    assert len(expected) == 5
    for task_id, doc in expected.items():
        assert reg.read_task(task_id) == doc
    assert reg.read_global() == json.loads((samples / GLOBAL_DIR / GLOBAL_FILE).read_bytes())


def test_the_samples_break_no_invariant(samples: Path) -> None:
    tasks = sample_tasks(samples)
    assert [str(v) for t in tasks.values() for v in task_violations(t)] == []
    glob = json.loads((samples / GLOBAL_DIR / GLOBAL_FILE).read_bytes())
    assert global_violations(glob, tasks) == []
    assert glob["total_agents_spawned"] == 27
    assert glob["active_agents"] == 1
