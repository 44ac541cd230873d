"""The harness's resolved options, shared by the plugin, the fixtures and the Hypothesis state machine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class OrchOptions:
    impl: str = "reference"
    concurrency: int = 4
    ops: int = 50
    seed: int = 0
    timeout: float = 300.0
    chaos: str | None = None  # --orch-chaos, e.g. "sigkill=3"; None: no faults
    schedule: str | None = None  # --orch-schedule, "random" or "pct:3" (pytest_orch.schedule); None: free-running
    report: str | None = None  # --orch-report: a directory for each failing swarm's artifacts (pytest_orch.artifacts)
    report_all: bool = False  # --orch-report-all: every swarm's, not only failing ones


_current = OrchOptions()


def current() -> OrchOptions:
    """The options of the running pytest session (defaults outside one)."""
    return _current


def set_current(options: OrchOptions) -> None:
    global _current
    _current = options


def orch_args(options: OrchOptions) -> list[str]:
    """The command-line flags that reproduce *options*."""
    args = [f"--orch-impl={options.impl}", f"--orch-seed={options.seed}", f"--orch-concurrency={options.concurrency}",
            f"--orch-ops={options.ops}"]
    if options.chaos:
        args.append(f"--orch-chaos={options.chaos}")
    if options.schedule:
        args.append(f"--orch-schedule={options.schedule}")
    return args


def _silent(line: str) -> None:
    """Outside a pytest session nobody is watching."""


_progress: Callable[[str], None] = _silent


def progress(line: str) -> None:
    """Show *line* on the terminal now, through the capture (the plugin installs the writer)."""
    _progress(line)


def progress_writer() -> Callable[[str], None]:
    return _progress


def set_progress(writer: Callable[[str], None]) -> None:
    global _progress
    _progress = writer
