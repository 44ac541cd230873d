"""The harness's exceptions form one tree (pytest_orch.errors): a verdict against the registry is an OrchFailure (an
AssertionError, so pytest reports a failed test), the harness's own trouble a HarnessError; both are OrchErrors."""

from __future__ import annotations

import pytest

from pytest_orch.adapter import Rejected
from pytest_orch.burst import BurstError
from pytest_orch.chaos import ChaosError
from pytest_orch.checks import OrchViolation
from pytest_orch.errors import HarnessError, OrchError, OrchFailure
from pytest_orch.stateful import BurstFailure, LostUpdate, ModelMismatch, StepFailure
from pytest_orch.swarm import SwarmError, SwarmTimeout


@pytest.mark.parametrize("cls", [OrchViolation, SwarmError, SwarmTimeout, ModelMismatch, StepFailure, BurstFailure,
                                 LostUpdate])
def test_every_verdict_against_the_registry_is_an_orch_failure_and_an_assertion_error(cls: type) -> None:
    assert issubclass(cls, OrchFailure)
    assert issubclass(cls, AssertionError)


@pytest.mark.parametrize("cls", [ChaosError, BurstError])
def test_the_harness_own_trouble_is_a_harness_error_not_a_failure(cls: type) -> None:
    assert issubclass(cls, HarnessError)
    assert not issubclass(cls, AssertionError)


def test_both_branches_share_one_base_and_a_registry_refusal_is_not_in_the_tree() -> None:
    assert issubclass(OrchFailure, OrchError)
    assert issubclass(HarnessError, OrchError)
    assert not issubclass(Rejected, OrchError)
