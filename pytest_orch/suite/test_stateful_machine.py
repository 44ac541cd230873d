"""The Hypothesis state machine against the registry that ``--orch-impl`` names.

Generated programs of creates, deploys, updates (the illegal ones too), kills and sessions lost behind the registry's
back, with concurrent bursts of 2..``--orch-concurrency`` operations checked for linearizability against the model
in :mod:`pytest_orch.stateful`.  Pick the effort with ``--hypothesis-profile=dev|ci|soak`` (``ci`` when ``$CI`` is
set).
"""

from __future__ import annotations

from pytest_orch.stateful import RegistryMachine, run_machine


def test_the_registry_matches_its_model_under_generated_programs_and_concurrent_bursts() -> None:
    run_machine(RegistryMachine)
