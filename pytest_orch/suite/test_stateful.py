"""The registry next to its model under Hypothesis: generated programs of operations, concurrent bursts checked for
linearizability, and the smallest failing program reported.

Run it against your own registry::

    pytest --pyargs pytest_orch.suite --orch-impl=myorch.testing:adapter --orch-concurrency=10 --hypothesis-profile=ci

``--orch-concurrency`` is the largest burst (at most 16).  The Hypothesis profile decides how many programs run:
``dev`` (the default here: 10 programs of up to 10 steps), ``ci`` (100 programs, derandomized; the default when the
``CI`` environment variable is set), ``soak`` (500 programs of up to 40 steps).  To add rules of your own, subclass
:class:`pytest_orch.stateful.RegistryMachine` and run it with :func:`pytest_orch.stateful.run_machine`.
"""

from __future__ import annotations

from pytest_orch.stateful import RegistryMachine, run_machine


def test_the_registry_behaves_like_its_model_under_generated_programs_and_concurrent_bursts() -> None:
    run_machine(RegistryMachine)
