from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_orch.tmux import QUIET_AGENT_COMMAND, private_server
from registry import Registry, TmuxSessions

#: The real registry files, found as the benchmarks find them: ``$ORCH_SAMPLES`` (a workspace folder) or the samples in
#: ``shared/`` beside the checkout.
SAMPLES = Path(os.environ.get("ORCH_SAMPLES") or Path(__file__).resolve().parents[2] / "shared" / "samples"
               / "orchestrator-2025-10" / ".agent-workspace")


@pytest.fixture
def tmux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TmuxSessions]:
    """A private tmux server for this test; the registry finds it through TMUX_TMPDIR."""
    monkeypatch.setenv("ORCH_AGENT_COMMAND", QUIET_AGENT_COMMAND)
    with private_server(tmp_path / "tmux"):
        yield TmuxSessions()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


@pytest.fixture
def reg(base: Path, tmux: TmuxSessions) -> Registry:
    return Registry(base)


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    """A writable copy of the real registry files in shared/samples."""
    if not SAMPLES.is_dir():
        pytest.skip(f"the sample registries are not at {SAMPLES}: set ORCH_SAMPLES to a workspace of them"
                    " (shared/samples/orchestrator-2025-10/.agent-workspace)")
    copy = tmp_path / "samples"
    shutil.copytree(SAMPLES, copy)
    for path in copy.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return copy
