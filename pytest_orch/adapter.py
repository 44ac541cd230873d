"""The contract between the harness and a registry, and the loader of ``package.module:factory``.

A team points the harness at its own registry by writing a factory::

    # myorch/testing.py
    from pytest_orch.adapter import Rejected

    class MyAdapter:
        promises = frozenset({"max_agents", "max_depth"})       # optional: the rules this registry enforces

        def __init__(self, workspace): ...
        def create_task(self, description, *, max_agents, max_concurrent, max_depth): ...   # -> task id
        def deploy(self, task_id, agent_type, parent="orchestrator"): ...                  # -> agent id
        ...

    def adapter(workspace):
        return MyAdapter(workspace)

and running ``pytest --pyargs pytest_orch.suite --orch-impl=myorch.testing:adapter``.

Outcomes, as in Jepsen: a return is ``ok`` (applied), :class:`Rejected` is ``fail`` (certainly not applied), anything
else is ``info`` (unknown: it may or may not have been applied).  Raise Rejected only when you are sure: a
``{"success": False}`` result that may have written something is not a refusal.  An exception is counted, and fails
the test as a ``crash`` (or ``torn_read``) unless the adapter declares it with ``expected_errors = (LockTimeout,)``.

Besides ``promises``, an adapter declares the rules its registry follows where legitimate designs differ
(``rules = Rules(kill_of_terminal="ignored")``, see :class:`pytest_orch.spec.Rules`), or a specification of its own
(``spec = MySpec``, a subclass of :class:`pytest_orch.spec.Spec`).  ``read_task`` returns ``{"agents": [...]}`` with
the keys the declared rules name; ``read_global`` may return None.  Background actors of the registry (reapers,
daemons) must be stopped for the run, or their effect declared.  The README states each operation's meaning.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["ALL_PROMISES", "LegacyAdapter", "ReferenceAdapter", "RegistryAdapter", "Rejected", "load_factory",
           "promises_of"]

#: The rules an adapter may promise; checks of rules it does not promise are skipped.
ALL_PROMISES = frozenset({"unique_type", "max_agents", "max_concurrent", "max_depth"})


class Rejected(Exception):
    """The registry refused the operation; it was definitely not applied."""


@runtime_checkable
class RegistryAdapter(Protocol):
    def create_task(self, description: str, *, max_agents: int, max_concurrent: int, max_depth: int) -> str: ...
    def deploy(self, task_id: str, agent_type: str, parent: str = "orchestrator") -> str: ...  # returns agent id
    def update(self, task_id: str, agent_id: str, status: str, progress: int) -> None: ...
    def kill(self, task_id: str, agent_id: str) -> None: ...
    def reconcile(self, task_id: str) -> None: ...  # the status call that reaps agents whose session is gone
    def read_task(self, task_id: str) -> dict[str, Any]: ...  # the task registry document
    def read_global(self) -> dict[str, Any] | None: ...  # the global registry document, or None if there is none


Factory = Callable[[Path], RegistryAdapter]


def promises_of(adapter: object) -> frozenset[str]:
    """The rules *adapter* promises to enforce (all of them unless it says otherwise)."""
    promises = getattr(adapter, "promises", ALL_PROMISES)
    return frozenset(promises) & ALL_PROMISES


class _RegistryAdapter:
    """Shared by the built-in adapters: turn the registry's errors into outcomes."""

    reg: Any

    @property
    def expected_errors(self) -> tuple[type[Exception], ...]:
        """What the registry raises by design when an outcome is unknown (a failed disk write, a lock timeout):
        those stay ``info`` and are counted, not reported as crashes."""
        from registry.errors import LockTimeout, WriteFailed

        return (WriteFailed, LockTimeout)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from registry.errors import RegistryError

        try:
            return getattr(self.reg, method)(*args, **kwargs)
        except RegistryError as exc:
            if exc.applied is False:
                raise Rejected(f"{type(exc).__name__}: {exc}") from exc
            raise

    def create_task(self, description: str, *, max_agents: int, max_concurrent: int, max_depth: int) -> str:
        task_id: str = self._call("create_task", description, max_agents=max_agents, max_depth=max_depth,
                                  max_concurrent=max_concurrent)
        return task_id

    def deploy(self, task_id: str, agent_type: str, parent: str = "orchestrator") -> str:
        agent: dict[str, Any] = self._call("deploy", task_id, agent_type, f"harness {agent_type}", parent)
        return str(agent["id"])

    def update(self, task_id: str, agent_id: str, status: str, progress: int) -> None:
        self._call("update", task_id, agent_id, status, None, progress)

    def kill(self, task_id: str, agent_id: str) -> None:
        self._call("kill", task_id, agent_id)

    def reconcile(self, task_id: str) -> None:
        self._call("reconcile", task_id)

    def read_task(self, task_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.reg.read_task(task_id)
        return doc

    def read_global(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.reg.read_global()
        return doc


class ReferenceAdapter(_RegistryAdapter):
    """The reference registry (:mod:`registry`); *options* go to :class:`registry.Registry` (heal, lock_timeout)."""

    def __init__(self, workspace: Path, **options: Any) -> None:
        from registry import Registry

        self.reg = Registry(workspace, **options)


class LegacyAdapter(_RegistryAdapter):
    """The old unlocked registry (:mod:`registry.legacy`).  It never had deduplication, so it does not promise it."""

    promises = frozenset({"max_agents", "max_concurrent", "max_depth"})

    def __init__(self, workspace: Path) -> None:
        from registry.legacy import LegacyRegistry

        self.reg = LegacyRegistry(workspace)


BUILTIN: dict[str, Factory] = {"reference": ReferenceAdapter, "legacy": LegacyAdapter}


def load_factory(spec: str) -> Factory:
    """The factory named by *spec*: ``reference``, ``legacy`` or ``package.module:factory``.

    Raises ValueError with what to write instead when *spec* does not name a callable.
    """
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not an implementation: use 'reference', 'legacy' or 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for --orch-impl={spec}: {exc}"
                         f" (is it installed, or on PYTHONPATH? cwd is {Path.cwd()})") from exc
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (from --orch-impl={spec})")
    if not callable(factory):
        raise ValueError(f"{spec} is not callable; it must be a factory(workspace: pathlib.Path) -> adapter")
    return factory  # type: ignore[no-any-return]
