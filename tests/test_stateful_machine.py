"""The state machine as users run it: it passes the reference and shrinks a legacy failure to a small lost update."""

from __future__ import annotations

import re

import pytest


def _run(pytester: pytest.Pytester, impl: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("--pyargs", "pytest_orch.suite", "-k", "stateful", f"--orch-impl={impl}",
                                         "--orch-concurrency=10", "--hypothesis-profile=ci", "-p", "no:cacheprovider")


def test_the_reference_passes_the_state_machine_with_bursts_at_concurrency_10_in_the_ci_profile(
        pytester: pytest.Pytester) -> None:
    result = _run(pytester, "reference")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["orch: impl=reference, concurrency=10*"])


def test_legacy_fails_the_state_machine_with_a_shrunk_burst_of_at_most_3_operations_that_loses_an_update(
        pytester: pytest.Pytester) -> None:
    # Every run must fail with a lost update.  How far Hypothesis shrinks it depends on which bursts happen to race,
    # so a run that stops at a larger burst is followed by another, up to three.
    sizes = []
    for _ in range(3):
        result = _run(pytester, "legacy")
        result.assert_outcomes(failed=1)
        text = result.stdout.str()
        found = re.search(r"LostUpdate: Lost update: a burst of (\d+) operations on task \w+ is not linearizable",
                          text)
        assert found, text[-4000:]
        assert re.search(r"it failed in \d+ of \d+ runs; impl legacy", text)
        assert "Orders tried:" in text  # the orders the checker tried, for a person to follow
        assert "Failing test case: <state machine>" in text  # Hypothesis' shrunk program
        bursts = re.findall(r"^E\s+burst: (.*)$", text, flags=re.MULTILINE)
        assert bursts, text[-4000:]
        assert len(re.findall(r"#\d+ ", bursts[-1])) == int(found.group(1))
        sizes.append(int(found.group(1)))
        if sizes[-1] <= 3:
            break
    assert min(sizes) <= 3, f"the shrunk lost-update bursts had {sizes} operations"
    assert min(sizes) >= 2
