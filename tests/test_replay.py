"""The replay line a failure prints runs as printed: for a suite run with ``--pyargs`` (package or module), with a file
path, and for the stateful test (whose line carries the Hypothesis seed)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

import pytest_orch

SUITE = Path(pytest_orch.__file__).resolve().parent / "suite"


def _replay(pytester: pytest.Pytester, *args: str) -> tuple[str, pytest.RunResult]:
    line, _first, again = _replay_all(pytester, *args)
    return line, again


def _replay_all(pytester: pytest.Pytester, *args: str) -> tuple[str, str, pytest.RunResult]:
    """Run pytest with *args* (it must fail), then the replay line it printed, from the same directory."""
    first = pytester.run(sys.executable, "-m", "pytest", "--orch-impl=legacy", "--orch-concurrency=10",
                         "-p", "no:cacheprovider", *args)
    assert first.ret == pytest.ExitCode.TESTS_FAILED, first.stdout.str()[-3000:]
    lines = re.findall(r"^(?:E\s+)?replay: (pytest .*)$", first.stdout.str(), re.MULTILINE)
    assert lines, first.stdout.str()[-3000:]
    command = shlex.split(lines[0])
    assert command[0] == "pytest"
    again = pytester.run(sys.executable, "-m", "pytest", *command[1:], "-p", "no:cacheprovider")
    return lines[0], first.stdout.str(), again


@pytest.mark.parametrize("target", [["--pyargs", "pytest_orch.suite"],
                                    ["--pyargs", "pytest_orch.suite.test_registry_suite"],
                                    [str(SUITE / "test_registry_suite.py")]])
def test_the_replay_line_of_a_swarm_failure_runs_as_printed(pytester: pytest.Pytester, target: list[str]) -> None:
    line, again = _replay(pytester, *target, "-k", "distinct_types")
    text = again.stdout.str()
    assert "not found" not in text, text[-2000:]
    assert again.parseoutcomes().get("failed") == 1, text[-2000:]  # the one test, again against legacy
    assert "--orch-seed=" in line
    assert "test_concurrent_deploys_of_distinct_types_are_all_recorded" in line


def test_a_stateful_failure_prints_its_seed_and_a_replay_line_that_runs(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also: the stateful test shows its progress while it runs, and shrinks within its budget, saying so."""
    monkeypatch.setenv("ORCH_SHRINK_SECONDS", "2")
    monkeypatch.setenv("ORCH_PROGRESS_SECONDS", "0.5")
    line, first, again = _replay_all(pytester, "--pyargs", "pytest_orch.suite.test_stateful",
                                     "--hypothesis-profile=ci")
    assert re.search(r"--hypothesis-seed=\d+", line), line
    assert re.search(r"^  stateful RegistryMachine: \d+ s, \d+ programs, \d+ bursts", first, re.MULTILINE)
    assert "shrinking the failure found at" in first  # the progress says it is shrinking
    assert "shrinking stopped after 2 s with smaller programs still untried" in first
    text = again.stdout.str()
    assert "not found" not in text, text[-2000:]
    outcomes = again.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("passed", 0) == 1, text[-2000:]
