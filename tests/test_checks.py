"""Each check on hand-written histories: the good ones pass, the bad ones are caught and named."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pytest_orch.adapter import ALL_PROMISES
from pytest_orch.checks import (
    Final,
    OrchViolation,
    check_history,
    global_agreement,
    invariants,
    limits,
    lost_inserts,
    lost_updates,
    real_concurrency,
)
from pytest_orch.history import History, Op
from registry import model

T = "TASK-1"


class H:
    """A tiny builder of histories: ``h.op(p, "update", 0, 10, "ok", agent_id="a", status=..., progress=...)``."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def op(self, who: int, name: str, start: int, end: int | None, outcome: str = "ok", result: Any = None,
           fault: bool = False, **args: Any) -> Op:
        args.setdefault("task_id", T)
        op = Op(who, len(self.ops), name, args, start * 1_000_000, None if end is None else end * 1_000_000,
                outcome, result, None if outcome == "ok" else "boom", fault)  # type: ignore[arg-type]
        self.ops.append(op)
        return op

    def history(self, concurrency: int = 2, initial: dict[str, Any] | None = None) -> History:
        end = max((o.complete_ns or o.invoke_ns) for o in self.ops) if self.ops else 0
        return History(self.ops, concurrency, 10, 7, "test", 0, end + 1, initial or {})


def agent(agent_id: str, status: str = "running", progress: int = 0, parent: str = "orchestrator",
          depth: int = 1, type_: str | None = None) -> dict[str, Any]:
    return {"id": agent_id, "type": type_ or agent_id, "tmux_session": f"agent_{agent_id}", "parent": parent,
            "depth": depth, "status": status, "progress": progress}


def task(*agents: dict[str, Any], **limits: int) -> dict[str, Any]:
    doc = model.new_task_document(T, "t", priority="P1", max_agents=limits.get("max_agents", 45),
                                  max_depth=limits.get("max_depth", 5),
                                  max_concurrent=limits.get("max_concurrent", 20), workspace="w",
                                  workspace_base="b", client_cwd=None, now="now")
    doc["agents"] = list(agents)
    doc["agent_hierarchy"] = model.hierarchy_from_parents(doc["agents"])
    model.recompute_task_counters(doc)
    return doc


def glob_of(doc: dict[str, Any]) -> dict[str, Any]:
    glob = model.new_global_document("now")
    model.sync_global(glob, doc, "now")
    return glob


def final(doc: dict[str, Any], glob: dict[str, Any] | None = None, promises: frozenset[str] = ALL_PROMISES,
          same_global: bool = True) -> Final:
    return Final({T: doc}, glob if glob is not None or not same_global else glob_of(doc), promises)


# -- 1. invariants ------------------------------------------------------------------------------------------------


def test_invariants_pass_on_a_consistent_document() -> None:
    assert invariants(H().history(), final(task(agent("a"), agent("b", "completed")))) == []


def test_invariants_catch_count_drift_and_name_the_counter() -> None:
    doc = task(agent("a"))
    doc["active_count"] = 3
    problems = invariants(H().history(), final(doc))
    assert [p.check for p in problems] == ["invariants"]
    assert "active_count is 3" in problems[0].message


def test_invariants_report_a_document_that_could_not_be_read_as_corruption() -> None:
    f = Final({}, None, ALL_PROMISES, {T: "CorruptRegistry: AGENT_REGISTRY.json is corrupt"})
    problems = invariants(H().history(), f)
    assert problems[0].check == "corruption"
    assert "AGENT_REGISTRY.json is corrupt" in problems[0].message


def test_invariants_skip_limits_the_registry_does_not_promise() -> None:
    doc = task(agent("a"), agent("b"), max_concurrent=1)
    assert [p.message for p in invariants(H().history(), final(doc))] == [
        f"{T}: 2 agents are active, over max_concurrent 1"]
    assert invariants(H().history(), final(doc, promises=frozenset({"max_agents"}))) == []


# -- 2. lost inserts ----------------------------------------------------------------------------------------------


def test_every_ok_deploy_present_passes() -> None:
    h = H()
    h.op(0, "deploy", 0, 5, result="a", type="a", parent="orchestrator")
    h.op(1, "deploy", 1, 6, result="b", type="b", parent="orchestrator")
    assert lost_inserts(h.history(), final(task(agent("a"), agent("b")))) == []


def test_an_ok_deploy_missing_from_the_task_is_a_lost_insert_naming_the_agent() -> None:
    h = H()
    h.op(0, "deploy", 0, 5, result="a", type="a", parent="orchestrator")
    h.op(1, "deploy", 1, 6, result="b", type="b", parent="orchestrator")
    problems = lost_inserts(h.history(), final(task(agent("a"))))
    assert [(p.check, p.agents) for p in problems] == [("lost_insert", ("b",)), ("count_drift", ())]


def test_an_info_deploy_may_or_may_not_have_happened() -> None:
    h = H()
    h.op(0, "deploy", 0, 5, result="a", type="a", parent="orchestrator")
    h.op(1, "deploy", 1, None, "info", type="b", parent="orchestrator")
    hist = h.history()
    assert lost_inserts(hist, final(task(agent("a")))) == []
    assert lost_inserts(hist, final(task(agent("a"), agent("b")))) == []
    # ... but not twice
    problems = lost_inserts(hist, final(task(agent("a"), agent("b"), agent("c"))))
    assert {p.check for p in problems} == {"lost_insert", "count_drift"}


def test_an_ok_deploy_missing_from_the_global_registry_is_a_lost_insert() -> None:
    h = H()
    h.op(0, "deploy", 0, 5, result="a", type="a", parent="orchestrator")
    doc = task(agent("a"))
    problems = lost_inserts(h.history(), final(doc, glob=model.new_global_document("now")))
    assert [p.message for p in problems] == [f"agent a of task {T} was deployed (ok) but is missing from the"
                                             " global registry"]


# -- 3. lost updates ----------------------------------------------------------------------------------------------


def _two_updates(overlap: bool) -> History:
    h = H()
    h.op(0, "deploy", 0, 1, result="a", type="a", parent="orchestrator")
    h.op(0, "update", 2, 5, agent_id="a", status="working", progress=10)
    h.op(1, "update", 4 if overlap else 6, 8, agent_id="a", status="blocked", progress=20)
    return h.history()


def test_the_last_of_two_sequential_updates_wins() -> None:
    assert lost_updates(_two_updates(False), final(task(agent("a", "blocked", 20)))) == []


def test_an_earlier_update_surviving_a_later_one_is_a_lost_update() -> None:
    problems = lost_updates(_two_updates(False), final(task(agent("a", "working", 10))))
    assert [(p.check, p.agents) for p in problems] == [("lost_update", ("a",))]
    assert "ends working/10" in problems[0].message
    assert "blocked/20" in problems[0].message  # what the orders end in


def test_overlapping_updates_may_land_in_either_order() -> None:
    for status, progress in (("working", 10), ("blocked", 20)):
        assert lost_updates(_two_updates(True), final(task(agent("a", status, progress)))) == []


def test_a_kill_undone_by_a_later_write_is_caught() -> None:
    h = H()
    h.op(0, "deploy", 0, 1, result="a", type="a", parent="orchestrator")
    h.op(0, "kill", 2, 4, agent_id="a")
    h.op(1, "update", 1, 3, "ok", agent_id="a", status="working", progress=50)  # overlaps the kill
    hist = h.history()
    assert lost_updates(hist, final(task(agent("a", "terminated", 50)))) == []
    problems = lost_updates(hist, final(task(agent("a", "working", 50))))
    assert [p.check for p in problems] == ["lost_update"]


def test_an_ok_update_after_a_completed_kill_is_impossible() -> None:
    h = H()
    h.op(0, "deploy", 0, 1, result="a", type="a", parent="orchestrator")
    h.op(0, "kill", 2, 3, agent_id="a")
    h.op(1, "update", 4, 5, agent_id="a", status="working", progress=5)  # a registry must refuse this
    problems = lost_updates(h.history(), final(task(agent("a", "working", 5))))
    assert "no order completes: " in problems[0].message
    assert "update(agent_id=a, status=working, progress=5) by p1" in problems[0].message  # names the impossible op


def test_an_info_update_may_or_may_not_have_happened() -> None:
    h = H()
    h.op(0, "deploy", 0, 1, result="a", type="a", parent="orchestrator")
    h.op(0, "update", 2, 3, agent_id="a", status="working", progress=10)
    h.op(1, "update", 4, None, "info", agent_id="a", status="completed", progress=100)
    hist = h.history()
    assert lost_updates(hist, final(task(agent("a", "working", 10)))) == []
    assert lost_updates(hist, final(task(agent("a", "completed", 100)))) == []
    assert lost_updates(hist, final(task(agent("a", "blocked", 10)))) != []


def test_reconcile_terminates_only_an_agent_whose_session_was_killed() -> None:
    h = H()
    h.op(0, "deploy", 0, 1, result="a", type="a", parent="orchestrator")
    h.op(1, "tmux_kill", 2, 3, fault=True, session="agent_a")
    h.op(1, "reconcile", 4, 5)
    hist = h.history()
    assert lost_updates(hist, final(task(agent("a", "terminated", 0)))) == []
    assert [p.check for p in lost_updates(hist, final(task(agent("a", "running", 0))))] == ["lost_update"]


def test_failed_operations_change_nothing() -> None:
    h = H()
    h.op(0, "deploy", 0, 1, result="a", type="a", parent="orchestrator")
    h.op(1, "update", 2, 3, "fail", agent_id="a", status="completed", progress=100)
    hist = h.history()
    assert lost_updates(hist, final(task(agent("a", "running", 0)))) == []
    assert lost_updates(hist, final(task(agent("a", "completed", 100)))) != []


def test_agents_that_existed_before_the_swarm_start_from_their_recorded_state() -> None:
    before = task(agent("a", "working", 40))
    h = H()
    h.op(0, "update", 0, 1, "fail", agent_id="a", status="working", progress=41)
    hist = h.history(initial={T: before})
    assert lost_updates(hist, final(copy.deepcopy(before))) == []
    assert [p.check for p in lost_updates(hist, final(task(agent("a", "working", 41))))] == ["lost_update"]


# -- 4. limits and deduplication --------------------------------------------------------------------------------


def _deploys(n: int, type_of: Any = lambda i: f"t{i}", parent: str = "orchestrator") -> History:
    h = H()
    for i in range(n):
        h.op(i, "deploy", i, i + 10, result=f"a{i}", type=type_of(i), parent=parent)
    return h.history(concurrency=n)


def test_ok_deploys_beyond_max_agents_are_caught() -> None:
    doc = task(*(agent(f"a{i}", type_=f"t{i}") for i in range(3)), max_agents=2)
    problems = limits(_deploys(3), final(doc))
    assert [p.check for p in problems] == ["limits"]
    assert "over max_agents 2" in problems[0].message


def test_ok_deploys_beyond_max_concurrent_are_caught_when_nothing_finished() -> None:
    doc = task(*(agent(f"a{i}", type_=f"t{i}") for i in range(3)), max_concurrent=2)
    assert "over max_concurrent 2" in limits(_deploys(3), final(doc))[0].message


def test_max_concurrent_is_not_judged_from_history_once_agents_finish() -> None:
    h = H()
    h.op(0, "deploy", 0, 1, result="a0", type="t0", parent="orchestrator")
    h.op(0, "update", 2, 3, agent_id="a0", status="completed", progress=100)
    h.op(0, "deploy", 4, 5, result="a1", type="t1", parent="orchestrator")
    doc = task(agent("a0", "completed", 100, type_="t0"), agent("a1", type_="t1"), max_concurrent=1)
    assert limits(h.history(), final(doc)) == []


def test_a_deploy_under_a_parent_at_max_depth_is_caught() -> None:
    h = H()
    h.op(0, "deploy", 0, 1, result="c", type="c", parent="p")
    doc = task(agent("p", depth=1), agent("c", parent="p", depth=2), max_depth=1)
    assert "over max_depth 1" in limits(h.history(), final(doc))[0].message


def test_two_concurrent_ok_deploys_of_one_type_are_a_duplicate() -> None:
    doc = task(agent("a0", type_="same"), agent("a1", type_="same"))
    problems = limits(_deploys(2, type_of=lambda i: "same"), final(doc))
    assert [(p.check, set(p.agents)) for p in problems] == [("duplicate", {"a0", "a1"})]


def test_a_second_deploy_of_a_type_after_the_first_finished_is_fine() -> None:
    h = H()
    h.op(0, "deploy", 0, 1, result="a0", type="same", parent="orchestrator")
    h.op(0, "update", 2, 3, agent_id="a0", status="completed", progress=100)
    h.op(1, "deploy", 4, 5, result="a1", type="same", parent="orchestrator")
    doc = task(agent("a0", "completed", 100, type_="same"), agent("a1", type_="same"))
    assert limits(h.history(), final(doc)) == []
    assert limits(h.history(), final(doc, promises=frozenset())) == []


def test_duplicates_are_not_judged_for_a_registry_that_does_not_promise_them() -> None:
    doc = task(agent("a0", type_="same"), agent("a1", type_="same"))
    assert limits(_deploys(2, type_of=lambda i: "same"), final(doc, promises=frozenset({"max_agents"}))) == []


# -- 5. task and global agree -------------------------------------------------------------------------------------


def test_task_and_global_that_agree_pass() -> None:
    doc = task(agent("a"))
    assert global_agreement(H().history(), final(doc)) == []


def test_a_status_the_global_registry_missed_is_caught() -> None:
    doc = task(agent("a"))
    glob = glob_of(doc)
    doc["agents"][0]["status"] = "completed"
    model.recompute_task_counters(doc)
    problems = global_agreement(H().history(), final(doc, glob))
    assert {p.check for p in problems} == {"global_agreement"}
    assert any("status 'running' (task says 'completed')" in p.message for p in problems)


def test_global_checks_are_skipped_and_said_so_when_there_is_no_global_view() -> None:
    report = check_history(H().history(), final(task(), same_global=False))
    assert report.ok
    assert "read_global returned None: the global registry checks were skipped" in report.notes


# -- 6. real concurrency ------------------------------------------------------------------------------------------


def test_a_serial_run_is_inconclusive_not_a_pass() -> None:
    h = H()
    for i in range(10):
        h.op(i % 2, "update", i * 10, i * 10 + 5, agent_id="a", status="working", progress=i)
    problems = real_concurrency(h.history(), final(task()))
    assert [p.check for p in problems] == ["inconclusive"]
    assert "nearly serial" in problems[0].message


def test_overlapping_processes_count_as_real_concurrency() -> None:
    h = H()
    for i in range(10):
        h.op(i % 2, "update", i * 10, i * 10 + 15, agent_id="a", status="working", progress=i)
    assert real_concurrency(h.history(), final(task())) == []


# -- the report ---------------------------------------------------------------------------------------------------


def test_the_report_names_the_check_the_agents_a_timeline_the_seed_and_the_replay_command() -> None:
    report = check_history(_two_updates(False), final(task(agent("a", "working", 10))), replay="pytest x --orch-seed=7")
    text = report.render()
    assert not report.ok
    assert "[lost_update] agent a" in text
    assert "lost_update: 1: a" in text
    assert "timeline (ms from the swarm's start):" in text
    assert "update(agent_id=a, status=blocked, progress=20)" in text
    assert "seed 7" in text
    assert text.endswith("replay: pytest x --orch-seed=7")
    with pytest.raises(AssertionError, match="lost_update"):
        raise OrchViolation(report)


def test_a_killed_tmux_server_takes_every_session_with_it() -> None:
    h = H()
    h.op(0, "deploy", 0, 1, result="a", type="a", parent="orchestrator")
    h.op(-1, "tmux_server_sigkill", 2, 3, fault=True, pid=123)
    h.op(1, "reconcile", 4, 5)
    hist = h.history()
    assert lost_updates(hist, final(task(agent("a", "terminated", 0)))) == []
    assert [p.check for p in lost_updates(hist, final(task(agent("a", "running", 0))))] == ["lost_update"]


def test_the_report_lists_each_fault_with_the_operation_it_cut_short() -> None:
    h = H()
    h.op(0, "deploy", 0, 1, result="a", type="a", parent="orchestrator")
    h.op(1, "update", 2, None, "info", agent_id="a", status="working", progress=5)
    h.op(1, "crash", 3, 3, fault=True, point="after_fsync", file="task")
    h.op(-1, "sigkill", 4, 4, fault=True, process=0)
    report = check_history(h.history(), final(task(agent("a", "working", 5))))
    assert report.faults() == [
        "       3.0 ms  crash of p1 at after_fsync (task): cut short update(agent_id=a, status=working, progress=5)",
        "       4.0 ms  SIGKILL p0 between operations",
    ]


def test_a_tmux_server_killed_before_an_agent_was_deployed_did_not_take_its_session() -> None:
    h = H()
    h.op(-1, "tmux_server_sigkill", 0, 1, fault=True, pid=123)
    h.op(0, "deploy", 2, 3, result="a", type="a", parent="orchestrator")
    h.op(1, "reconcile", 4, 5)
    hist = h.history()
    assert lost_updates(hist, final(task(agent("a", "running", 0)))) == []
    assert [p.check for p in lost_updates(hist, final(task(agent("a", "terminated", 0))))] == ["lost_update"]
