"""The linearizability checker on hand-written histories.

Times are in arbitrary units: a call is ``(invoke, complete)``; ``complete=None`` is a call that never returned.
Two models: a counter (``inc`` adds one and returns the new value, ``read`` returns it) and the registry
specification of :mod:`pytest_orch.stateful`.
"""

from __future__ import annotations

from typing import Any

from pytest_orch.linearize import Applied, Call, Outcome, Refused, linearize, lost
from pytest_orch.stateful import AgentModel, Command, RegistryModel, Specification, TaskModel


def counter(state: int, call: Call) -> Applied[int] | Refused:
    if call.op == "inc":
        return Applied(state + 1, state + 1)
    if call.op == "read":
        return Applied(state, state)
    if call.op == "dec_if_positive":
        return Applied(state - 1) if state > 0 else Refused("zero")
    raise AssertionError(call.op)


def same_result(call: Call, model_result: Any) -> bool:
    return call.result is None or call.result == model_result


def ends_at(n: int) -> Any:
    return lambda state: state == n


def check(calls: list[Call], final: int, **kwargs: Any) -> bool:
    return linearize(calls, 0, counter, ends_at(final), results_match=same_result, **kwargs).ok


# --------------------------------------------------------------------------------------------------------------------
# Linearizable histories are accepted


def test_two_overlapping_increments_that_both_count_are_accepted() -> None:
    calls = [Call(0, "inc", 0, 10, "ok"), Call(1, "inc", 5, 15, "ok")]
    assert check(calls, final=2)


def test_overlapping_calls_may_take_effect_in_the_order_opposite_to_their_invocations() -> None:
    # inc invoked first but its result (2) says it went second; the read, overlapping both, saw 1.
    calls = [Call(0, "inc", 0, 20, "ok", result=2), Call(1, "inc", 5, 25, "ok", result=1),
             Call(2, "read", 6, 30, "ok", result=1)]
    search = linearize(calls, 0, counter, ends_at(2), results_match=same_result)
    assert search.ok
    assert search.order == ["1", "2", "0"]
    assert search.final_state == 2


def test_a_failed_call_is_accepted_where_the_model_refuses_it() -> None:
    calls = [Call(0, "dec_if_positive", 0, 10, "fail"), Call(1, "inc", 20, 30, "ok")]
    assert check(calls, final=1)


def test_a_call_that_may_or_may_not_be_refused_explains_either_outcome() -> None:
    def either(state: int, call: Call) -> tuple[Applied[int], Refused]:
        return Applied(state + 1), Refused("not promised")

    outcomes: tuple[tuple[Outcome, int], ...] = (("ok", 1), ("fail", 0))
    for outcome, final in outcomes:
        calls = [Call(0, "maybe", 0, 10, outcome)]
        assert linearize(calls, 0, either, ends_at(final)).ok


# --------------------------------------------------------------------------------------------------------------------
# Classic non-linearizable histories are rejected


def test_a_lost_update_is_rejected_and_each_increment_alone_explains_it() -> None:
    calls = [Call(0, "inc", 0, 10, "ok"), Call(1, "inc", 5, 15, "ok")]
    search = linearize(calls, 0, counter, ends_at(1))
    assert not search.ok
    assert search.final_states == [2]
    assert search.final_orders == [["0", "1"]]  # the first order that reached each distinct end state
    assert lost(calls, 0, counter, ends_at(1)) == [0, 1]


def test_a_stale_read_of_a_counter_is_rejected() -> None:
    # The increment returned before the read began, yet the read saw the old value.
    calls = [Call(0, "inc", 0, 10, "ok", result=1), Call(1, "read", 20, 30, "ok", result=0)]
    assert not check(calls, final=1)


def test_the_same_read_is_accepted_when_it_overlaps_the_increment() -> None:
    calls = [Call(0, "inc", 0, 25, "ok", result=1), Call(1, "read", 20, 30, "ok", result=0)]
    assert check(calls, final=1)


def test_a_failed_call_the_model_would_have_applied_is_rejected_unless_failures_are_lenient() -> None:
    calls = [Call(0, "inc", 0, 10, "ok"), Call(1, "dec_if_positive", 20, 30, "fail")]
    assert not check(calls, final=1)
    assert check(calls, final=1, strict_fail=False)


def test_real_time_order_is_respected() -> None:
    # A read of 0 that began after the increment returned cannot go first; one that returned before it began must.
    calls = [Call(0, "inc", 0, 10, "ok"), Call(1, "read", 11, 12, "ok", result=0)]
    assert not check(calls, final=1)
    assert check([Call(0, "inc", 11, 20, "ok"), Call(1, "read", 0, 10, "ok", result=0)], final=1)


def test_a_kill_undone_by_a_later_write_is_rejected() -> None:
    spec = Specification()
    agent = AgentModel("a0", "builder", "orchestrator", 1)
    state = RegistryModel((TaskModel("t0", 5, 5, 3, (agent,)),))
    kill = Command("kill", "t0", "a0")
    update = Command("update", "t0", "a0", status="working", progress=50)
    revived = RegistryModel((TaskModel("t0", 5, 5, 3, (AgentModel("a0", "builder", "orchestrator", 1,
                                                                   "working", 50, False),)),))
    calls = [Call(0, kill, 0, 10, "ok"), Call(1, update, 20, 30, "ok")]
    search = linearize(calls, state, spec, lambda s: s == revived)
    assert not search.ok
    assert search.final_states == []  # no order gets both calls applied: an update after a kill is refused
    # Had they overlapped, the update could have gone first and the kill last: then only 'terminated' is right.
    overlapping = [Call(0, kill, 0, 30, "ok"), Call(1, update, 5, 25, "ok")]
    assert not linearize(overlapping, state, spec, lambda s: s == revived).ok
    assert linearize(overlapping, state, spec,
                     lambda s: s.tasks[0].agents[0].status == "terminated").ok


# --------------------------------------------------------------------------------------------------------------------
# info calls may have happened, or not


def test_an_info_call_may_have_taken_effect() -> None:
    calls = [Call(0, "inc", 0, 10, "ok"), Call(1, "inc", 5, None, "info")]
    assert check(calls, final=2)


def test_an_info_call_may_not_have_taken_effect() -> None:
    calls = [Call(0, "inc", 0, 10, "ok"), Call(1, "inc", 5, None, "info")]
    search = linearize(calls, 0, counter, ends_at(1))
    assert search.order is not None
    assert "~1" in search.order


def test_an_info_call_cannot_explain_more_than_its_own_effect() -> None:
    calls = [Call(0, "inc", 0, 10, "ok"), Call(1, "inc", 5, None, "info")]
    assert not check(calls, final=3)


def test_an_info_call_that_never_returned_may_take_effect_after_later_calls() -> None:
    # The info increment was invoked first but, never having returned, may land after the read of 1.
    calls = [Call(0, "inc", 0, None, "info"), Call(1, "inc", 5, 10, "ok", result=1),
             Call(2, "read", 20, 30, "ok", result=1)]
    search = linearize(calls, 0, counter, ends_at(2), results_match=same_result)
    assert search.order is not None
    assert search.order.index("?0") > search.order.index("2")


# --------------------------------------------------------------------------------------------------------------------
# The search itself


def test_prune_cuts_states_that_cannot_end_well_without_changing_the_answer() -> None:
    calls = [Call(i, "inc", 0, 100, "ok") for i in range(6)]
    plain = linearize(calls, 0, counter, ends_at(5))
    pruned = linearize(calls, 0, counter, ends_at(5), prune=lambda n: n > 5)
    assert not plain.ok
    assert not pruned.ok
    assert pruned.explored <= plain.explored


def test_a_search_that_runs_out_of_budget_says_so() -> None:
    calls = [Call(i, "inc", 0, 100, "ok") for i in range(8)]
    search = linearize(calls, 0, counter, ends_at(0), budget=5)
    assert not search.ok
    assert search.exhausted
    assert search.explored == 5


def test_a_history_of_5000_updates_of_one_agent_is_searched_without_recursion() -> None:
    """Thousands of calls are thousands of levels of search: the search keeps its own stack, not Python's."""
    import sys
    import time

    from pytest_orch.checks import Final, lost_updates
    from pytest_orch.history import History, Op

    n = 5000
    ops = [Op(0, 0, "deploy", {"task_id": "T", "type": "a", "parent": "orchestrator"}, 0, 5, "ok", "a")]
    for k in range(n):  # two processes alternating, each update overlapping the next
        ops.append(Op(k % 2, k + 1, "update", {"task_id": "T", "agent_id": "a", "status": "working", "progress": k},
                      10 + 10 * k, 25 + 10 * k, "ok"))
    history = History(ops, 2, n, 7, "test", 0, 30 + 10 * n)

    def doc(progress: int) -> dict[str, object]:
        return {"task_id": "T", "agents": [{"id": "a", "type": "a", "status": "working", "progress": progress}]}

    started = time.monotonic()
    assert sys.getrecursionlimit() < n
    assert lost_updates(history, Final({"T": doc(n - 1)}, None, frozenset())) == []
    # The last update cannot be lost behind the one before it: they overlap, so either may win.
    assert lost_updates(history, Final({"T": doc(n - 2)}, None, frozenset())) == []
    problems = lost_updates(history, Final({"T": doc(n - 3)}, None, frozenset()))
    assert [p.check for p in problems] == ["lost_update"]
    assert time.monotonic() - started < 60
