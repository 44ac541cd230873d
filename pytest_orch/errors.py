"""Every exception the harness raises itself, in one tree (issue 11).

- :class:`OrchError`: the base of everything the harness raises about a run.

  - :class:`OrchFailure` (also an :class:`AssertionError`, so pytest reports a failed test): a verdict against the
    registry.  The checks' :class:`~pytest_orch.checks.OrchViolation`, the swarm's
    :class:`~pytest_orch.swarm.SwarmError` and :class:`~pytest_orch.swarm.SwarmTimeout`, and the state machine's
    :class:`~pytest_orch.stateful.ModelMismatch` family are its subclasses.
  - :class:`HarnessError` (also a :class:`RuntimeError`): the harness's own machinery failed (a fault that could not
    be injected, a burst pool that could not start): a problem of the harness or the machine, not of the registry.

:class:`~pytest_orch.adapter.Rejected` is not here: registries raise it (a refusal the contract allows), not the
harness.  Neither is a usage error (a bad option, marker argument or adapter): the harness raises pytest's own
:class:`pytest.UsageError`, which pytest prints as such and runs nothing; it is final, so no class of ours can extend
it.
"""

from __future__ import annotations

__all__ = ["HarnessError", "OrchError", "OrchFailure"]


class OrchError(Exception):
    """Anything pytest-orch raises itself."""


class OrchFailure(OrchError, AssertionError):
    """The registry failed a check; the message is the report."""


class HarnessError(OrchError, RuntimeError):
    """The harness could not do what it was asked (not the registry's fault)."""
