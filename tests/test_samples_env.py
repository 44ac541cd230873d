"""The tests find the sample registries through ``ORCH_SAMPLES`` as the benchmarks do, and skip saying so if absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLES

TESTS = Path(__file__).resolve().parent


def _sample_tests(samples: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCH_SAMPLES": samples}
    return subprocess.run([sys.executable, "-m", "pytest", str(TESTS / "test_cli.py"), "-k", "samples", "-rs", "-q",
                           "-p", "no:cacheprovider"], capture_output=True, text=True, env=env, cwd=TESTS.parent,
                          check=False)


def test_absent_samples_are_skipped_saying_where_they_were_looked_for(tmp_path: Path) -> None:
    result = _sample_tests(str(tmp_path / "nowhere"))
    assert result.returncode == 0, result.stdout[-2000:]
    assert f"the sample registries are not at {tmp_path / 'nowhere'}: set ORCH_SAMPLES" in result.stdout
    assert "3 skipped" in result.stdout


def test_orch_samples_points_the_tests_at_a_copy_of_the_samples(tmp_path: Path) -> None:
    if not SAMPLES.is_dir():
        pytest.skip(f"the sample registries are not at {SAMPLES}")
    copy = tmp_path / "elsewhere"
    shutil.copytree(SAMPLES, copy)
    result = _sample_tests(str(copy))
    assert result.returncode == 0, result.stdout[-2000:]
    assert "3 passed" in result.stdout
