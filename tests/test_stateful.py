"""The Hypothesis state machine as users run it (pytester, in subprocesses), and the model it checks against.

The two long tests run the ready-made stateful test of ``pytest_orch.suite`` in the ``ci`` profile at concurrency 10:
against the reference registry it passes; against the legacy one it fails, and Hypothesis shrinks the failure to a
burst of at most three operations whose report shows a lost update.  Scheduled (``--orch-schedule=pct``) the same
holds without reruns: legacy's failure shrinks to a lost update of two operations, printed with the schedule it took
(``ORCH_SOAK=1``: ten Hypothesis seeds).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.errors import InvalidArgument

from pytest_orch.linearize import Applied, Refused
from pytest_orch.stateful import AgentModel, Command, RegistryModel, Specification, TaskModel

SUITE = "pytest_orch.suite.test_stateful"
SOAK = bool(os.environ.get("ORCH_SOAK"))

Run = Callable[..., pytest.RunResult]

#: What the plugin does at import and in pytest_configure, for a run whose plugin does not do it (yet).
PROFILES_PLUGIN = """
from pytest_orch.stateful import register_profiles, select_profile

register_profiles()


def pytest_configure(config):
    select_profile(config)
"""


def _plugin_registers_profiles() -> bool:
    import pytest_orch.plugin  # noqa: F401  (the pytest11 entry point; registers the profiles when it imports)

    try:
        settings.get_profile("ci")
    except InvalidArgument:
        return False
    return True


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Run:
    """``run(*args)``: pytest in a subprocess, strict like this repository, with the profiles registered."""
    monkeypatch.delenv("CI", raising=False)
    for var in ("ORCH_CONCURRENCY", "ORCH_IMPL", "ORCH_OPS", "ORCH_SEED", "ORCH_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    pytester.makeini("[pytest]\nfilterwarnings = error\naddopts = --strict-markers -p no:cacheprovider\n")
    extra: list[str] = []
    if not _plugin_registers_profiles():
        pytester.makepyfile(orch_profiles=PROFILES_PLUGIN)
        extra = ["-p", "orch_profiles"]

    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess(*extra, *args)

    return run


# --------------------------------------------------------------------------------------------------------------------
# The machine against the built-in registries


def test_the_machine_passes_against_the_reference_with_bursts_of_ten_in_the_ci_profile(run: Run) -> None:
    result = run("--pyargs", SUITE, "--orch-impl=reference", "--orch-concurrency=10",
                 "--hypothesis-profile=ci", "-v")
    assert result.ret == 0, result.stdout.str()[-4000:]
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["orch: impl=reference, concurrency=10, *", "hypothesis profile 'ci' -> *"])


def _legacy_failure(run: Run) -> int:
    """Run the machine against legacy once, check the failure report, and return the size of the shrunk burst."""
    result = run("--pyargs", SUITE, "--orch-impl=legacy", "--orch-concurrency=10",
                 "--hypothesis-profile=ci")
    text = result.stdout.str()
    result.assert_outcomes(failed=1)
    assert "LostUpdate: Lost update: a burst of" in text, text[-6000:]
    shrunk = re.search(r"Lost update: a burst of (\d+) operations", text)
    assert shrunk, text[-6000:]
    size = int(shrunk.group(1))
    assert size >= 2, text[-6000:]
    assert re.search(r"it failed in \d+ of \d+ runs; impl legacy", text)
    assert re.search(r"Lost update in the (task|global) registry: it holds exactly what the burst leaves if #\d",
                     text)
    # The report: each operation with its outcome, the final documents, and the orders tried.
    assert len(re.findall(r"  #\d  +[\d.]+ \.\. +[\d.]+  (ok|fail|info) ", text)) >= size
    for heading in ("Operations (ms from the first invoke", "The model before:", "Orders tried: ",
                    "Final documents:", "live tmux sessions:"):
        assert heading in text
    # Hypothesis printed the shrunk program, ending with the burst, and how to replay it.
    assert "state.burst(data=data(...), task=tasks_0)" in text
    assert "@reproduce_failure(" in text
    return size


def test_the_machine_fails_against_legacy_with_a_lost_update_shrunk_to_at_most_three_operations(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_SHRINK_SECONDS", "300")  # shrinking as far as it goes, not the default 20 s budget
    # Every run must fail with a lost update.  How far Hypothesis shrinks it depends on which of the smaller bursts
    # it tries happen to race reliably (measured: a burst of 4 in about 3 runs of 10), so a run that stops above 3
    # is followed by another, up to four in all.
    sizes: list[int] = []
    while len(sizes) < 4 and (not sizes or sizes[-1] > 3):
        sizes.append(_legacy_failure(run))
    assert min(sizes) <= 3, f"the shrunk lost-update bursts had {sizes} operations"


#: The ci profile, but its programs follow --hypothesis-seed (ci is derandomized: one set of programs, whatever the
#: seed), so that runs of different seeds explore different programs and schedules.
SEEDED_PROFILE = """
from hypothesis import settings

from pytest_orch.stateful import register_profiles

register_profiles()
settings.register_profile("seeded", settings.get_profile("ci"), derandomize=False, database=None)
"""


@pytest.mark.parametrize("seed", range(10) if SOAK else [0])
def test_scheduled_the_machine_shrinks_legacys_failure_to_a_lost_update_of_two_operations_with_its_schedule(
        run: Run, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Under PCT a burst's interleaving is part of the program Hypothesis draws, so a failing burst fails every time
    it runs and shrinks like any other draw: no reruns, no reliable share.  Measured on 2 cores, load average 1.4 to
    2.0 (issue 13): seeds 0-9 all shrank to two operations, in 13 s to 48 s a run (seed 0: 13 s; one run used up the
    40 s shrinking budget, already at two)."""
    monkeypatch.setenv("ORCH_SHRINK_SECONDS", "40")
    pytester.makeconftest(SEEDED_PROFILE)
    result = run("--pyargs", SUITE, "--orch-impl=legacy", "--orch-concurrency=10", "--orch-schedule=pct",
                 "--hypothesis-profile=seeded", f"--hypothesis-seed={seed}")
    text = result.stdout.str()
    result.assert_outcomes(failed=1)
    assert "LostUpdate: Lost update: a burst of 2 operations" in text, text[-6000:]
    # Every run of the failing program failed: the first, the shrinker's and Hypothesis' final replays.
    runs = re.search(r"it failed in (\d+) of (\d+) runs; impl legacy", text)
    assert runs, text[-6000:]
    assert runs.group(1) == runs.group(2), runs.group(0)
    assert "The schedule it took (p<i> runs #i): schedule pct:3 (drawn: p0 priority 0" in text, text[-6000:]
    steps = re.findall(r"^E +\d+\. p([01]) (\w+): (.*)$", text, re.MULTILINE)
    assert [p for p, _, event in steps if event.startswith("begin ")] == ["0", "1"], steps
    assert any(p == "0" and event.startswith("open ") for p, _, event in steps), steps
    assert re.search(r"Lost update in the (task|global) registry: it holds exactly what the burst leaves if #[01]",
                     text), text[-6000:]
    assert "Turn(priority=0, change_after=" in text  # the drawn schedule, in Hypothesis' program
    assert f"--orch-schedule=pct:3 --hypothesis-seed={seed} --hypothesis-profile=seeded" in text


def test_scheduled_the_machine_passes_against_the_reference(run: Run) -> None:
    result = run("--pyargs", SUITE, "--orch-impl=reference", "--orch-concurrency=10", "--orch-schedule=pct",
                 "--hypothesis-profile=ci", "-v")
    assert result.ret == 0, result.stdout.str()[-4000:]
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["orch: impl=reference, concurrency=10, *schedule=pct:3*"])


# --------------------------------------------------------------------------------------------------------------------
# Profiles and subclassing


def test_ci_is_the_profile_when_the_ci_variable_is_set_and_none_was_chosen(
        run: Run, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_profile="""
        from hypothesis import settings

        def test_profile():
            print("PROFILE", settings.get_current_profile_name(), settings().max_examples, settings().deadline)
    """)
    monkeypatch.setenv("CI", "true")
    run("-s").stdout.fnmatch_lines(["*PROFILE ci 100 None"])
    run("-s", "--hypothesis-profile=dev").stdout.fnmatch_lines(["*PROFILE dev 10 None"])
    monkeypatch.delenv("CI")
    run("-s").stdout.fnmatch_lines(["*PROFILE default 100 0:00:00.200000"])


def test_a_subclass_with_a_rule_of_its_own_runs_with_the_selected_implementation(
        run: Run, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mine="""
        from hypothesis import settings
        from hypothesis.stateful import rule

        from pytest_orch.stateful import Command, RegistryMachine, machine_settings, run_machine

        CALLS = []


        class Mine(RegistryMachine):
            @rule(task=RegistryMachine.tasks)
            def reconcile_twice(self, task):
                CALLS.append(self.impl_spec)
                self.run_serial(Command("reconcile", task))
                self.run_serial(Command("reconcile", task))


        def test_mine():
            # Ten short random programs skip a given rule now and then; thirty derandomized ones never do.
            run_machine(Mine, settings=settings(machine_settings(), max_examples=30, derandomize=True))
            assert CALLS and set(CALLS) == {"reference"}
    """)
    run("--orch-concurrency=3", "--hypothesis-profile=dev").assert_outcomes(passed=1)


# --------------------------------------------------------------------------------------------------------------------
# The model


def _state(*agents: AgentModel, max_agents: int = 10, max_concurrent: int = 10, max_depth: int = 3) -> RegistryModel:
    return RegistryModel((TaskModel("t0", max_agents, max_concurrent, max_depth, agents),))


def _agent(handle: str, agent_type: str = "builder", status: str = "running", *, parent: str = "orchestrator",
           depth: int = 1, session: bool = True) -> AgentModel:
    return AgentModel(handle, agent_type, parent, depth, status, 0, session)


def test_the_model_refuses_a_second_active_agent_of_a_type_only_when_unique_type_is_promised() -> None:
    state = _state(_agent("a0", "builder"))
    deploy = Command("deploy", "t0", "a1", "builder")
    assert isinstance(Specification().apply(state, deploy), Refused)
    either = Specification(frozenset({"max_agents", "max_concurrent", "max_depth"})).apply(state, deploy)
    assert isinstance(either, tuple)
    assert {type(e) for e in either} == {Applied, Refused}
    # A finished agent of that type is no obstacle.
    assert isinstance(Specification().apply(_state(_agent("a0", "builder", "completed")), deploy), Applied)


def test_the_model_counts_every_agent_ever_spawned_against_max_agents_and_only_active_ones_against_max_concurrent(
        ) -> None:
    done = _agent("a0", "fixer", "completed")
    deploy = Command("deploy", "t0", "a1", "builder")
    assert isinstance(Specification().apply(_state(done, max_agents=1), deploy), Refused)
    assert isinstance(Specification().apply(_state(done, max_concurrent=1), deploy), Applied)
    assert isinstance(Specification().apply(_state(_agent("a0", "fixer"), max_concurrent=1), deploy), Refused)


def test_the_model_puts_a_child_one_level_below_its_parent_of_any_status_and_refuses_past_max_depth() -> None:
    parent = _agent("a0", "fixer", "completed", depth=2)
    child = Specification().apply(_state(parent), Command("deploy", "t0", "a1", "builder", parent="a0"))
    assert isinstance(child, Applied)
    assert child.state.tasks[0].agent("a1") == _agent("a1", "builder", parent="a0", depth=3)
    too_deep = Specification().apply(_state(parent, max_depth=2), Command("deploy", "t0", "a1", "builder",
                                                                          parent="a0"))
    assert isinstance(too_deep, Refused)
    assert isinstance(Specification().apply(_state(), Command("deploy", "t0", "a1", "builder", parent="a9")),
                      Refused)


def test_the_model_refuses_unknown_statuses_and_any_change_to_a_terminal_agent() -> None:
    spec = Specification()
    assert isinstance(spec.apply(_state(_agent("a0")), Command("update", "t0", "a0", status="paused")), Refused)
    for status in ("completed", "terminated", "error", "failed"):
        finished = _state(_agent("a0", status=status))
        assert isinstance(spec.apply(finished, Command("update", "t0", "a0", status="running")), Refused)
        assert isinstance(spec.apply(finished, Command("kill", "t0", "a0")), Refused)


def test_the_model_reconciles_only_active_agents_whose_session_is_gone() -> None:
    state = _state(_agent("a0", session=False), _agent("a1", "fixer"), _agent("a2", "tester", "completed",
                                                                              session=False))
    after = Specification().apply(state, Command("reconcile", "t0"))
    assert isinstance(after, Applied)
    assert [a.status for a in after.state.tasks[0].agents] == ["terminated", "running", "completed"]


@pytest.mark.parametrize("impl", ["buggy_registries:reference_global_unlocked",
                                  *(["reference"] if os.environ.get("ORCH_SOAK") else [])])
def test_bursts_over_several_tasks_catch_a_global_registry_written_without_its_lock(
        run: Run, monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    """ORCH_BURST_TASKS=3: bursts mix operations of several tasks, all writing one global registry (the incident's
    scenario); the reference with the global registry's own lock removed loses writes, the reference does not."""
    monkeypatch.setenv("ORCH_BURST_TASKS", "3")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))
    # The race needs writers of two tasks to overlap on the global file: a run of 100 programs misses it now and
    # then (it passed once in a full-suite run; 8 of 8 runs on their own caught it), so a run that passes is followed
    # by another, up to three in all.
    for _ in range(1 if impl == "reference" else 3):
        result = run("--pyargs", SUITE, f"--orch-impl={impl}", "--orch-concurrency=10", "--hypothesis-profile=ci")
        if result.ret != pytest.ExitCode.OK:
            break
    text = result.stdout.str()
    if impl == "reference":
        assert result.ret == pytest.ExitCode.OK, text[-3000:]
        return
    assert result.ret == pytest.ExitCode.TESTS_FAILED, text[-3000:]
    assert re.search(r"burst of \d+ operations on tasks? t\d(, t\d)* is not linearizable", text), text[-3000:]


def test_a_registry_that_loses_nothing_but_breaks_its_limits_fails_with_no_lost_update_named(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deploy admitted on a stale read breaks unique_type and loses nothing: the machine, after looking for a lost
    update for ORCH_LOST_FIRST_SECONDS, shrinks the breach to two deploys and calls it what it is; and a registry
    without a global registry is never said to have lost a write in one."""
    monkeypatch.setenv("ORCH_LOST_FIRST_SECONDS", "3")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))
    result = run("--pyargs", SUITE, "--orch-impl=buggy_registries:admits_before_lock", "--orch-concurrency=10",
                 "--hypothesis-profile=ci")
    text = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, text[-3000:]
    assert re.search(r"BurstFailure: A burst of 2 operations on task t\d is not linearizable", text), text[-6000:]
    assert "Lost update" not in text, text[-6000:]
    assert len(re.findall(r"  #\d  +[\d.]+ \.\. +[\d.]+  ok    deploy\(t\d, '(\w+)'", text)) == 2, text[-6000:]
