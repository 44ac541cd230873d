"""The replay line: a ``pytest`` command that runs one failing test again, as printed, from where pytest was started.

A suite run with ``--pyargs`` is replayed with ``--pyargs package.module::test``; any other run with the test file's
path relative to the directory pytest was started in.  The plugin records how pytest was started
(:func:`set_invocation`); the swarm fixture and the state machine build their lines with :func:`replay_command`.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Invocation", "current_test", "replay_command", "set_current_test", "set_invocation"]


@dataclass(frozen=True)
class Invocation:
    pyargs: bool
    dir: Path  # where pytest was started
    rootdir: Path


_invocation = Invocation(False, Path.cwd(), Path.cwd())


def set_invocation(invocation: Invocation) -> None:
    global _invocation
    _invocation = invocation


def _module_of(path: Path) -> str | None:
    """The dotted name *path* is imported as: its folder and each parent that is a package."""
    if path.suffix != ".py":
        return None
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").exists():
        parts.append(folder.name)
        folder = folder.parent
    return ".".join(reversed(parts))


_current: tuple[Path, str] | None = None


def set_current_test(path: Path, name: str) -> None:
    """Record the test about to run: its file and its name within the file (``Class::test[param]``)."""
    global _current
    _current = (path, name)


def current_test() -> tuple[Path, str] | None:
    """The running test's file and name, as :func:`set_current_test` recorded it (the plugin does, at setup)."""
    return _current


def replay_command(path: Path, name: str, args: Sequence[str]) -> str:
    """``pytest <the test> <args>``, runnable as printed from the directory pytest was started in."""
    module = _module_of(path) if _invocation.pyargs else None
    if module is not None:
        target = ["--pyargs", f"{module}::{name}"]
    else:
        try:
            shown = os.path.relpath(path, _invocation.dir)
        except ValueError:
            shown = str(path)
        target = [f"{shown if not shown.startswith('../..') else path}::{name}"]
    return "pytest " + " ".join(shlex.quote(a) for a in (*target, *args))
