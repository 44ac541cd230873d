"""Long runs, behind ORCH_SOAK=1 (``tox -e soak``): the suite must pass 20 runs in a row with different seeds."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("ORCH_SOAK"), reason="a soak: run with ORCH_SOAK=1 (tox -e soak)")


@pytest.mark.parametrize("run", range(20))
def test_the_suite_passes_against_the_reference_at_concurrency_10_with_seed(pytester: pytest.Pytester,
                                                                            run: int) -> None:
    result = pytester.runpytest_subprocess("--pyargs", "pytest_orch.suite", "--orch-concurrency=10",
                                           f"--orch-seed={1000 + run}", "-k", "not stateful", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=15)  # the contract and the 14 swarm tests
