"""The CI gate of benchmarks/README.md: save a baseline, then fail on a median regression, pass without one.

The slowed build is the benchmarks' own knob ``ORCH_BENCH_SLOWDOWN`` (a busy wait in every timed operation, read by
``benchmarks/knobs.py``); nothing in ``registry/`` is touched.  One small benchmark (parsing the 20 KB sample with the
store's codec, ~40 µs) keeps the three runs short; the threshold is loose (300 %) so that a busy shared machine does not
fail the unchanged run, and the slowdown (2 ms a call, some 50x) is far past it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELECTION = ["benchmarks/test_codec.py", "-k", "parse and store and sample"]
THRESHOLD = "median:300%"


def _run(storage: Path, *args: str, slowdown: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ORCH_BENCH_SLOWDOWN", "PYTEST_ADDOPTS")}
    if slowdown is not None:
        env["ORCH_BENCH_SLOWDOWN"] = slowdown
    return subprocess.run(
        [sys.executable, "-m", "pytest", *SELECTION, "-q", "-p", "no:cacheprovider",
         f"--benchmark-storage={storage.as_uri()}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    if not (ROOT / "benchmarks" / "test_codec.py").is_file():
        pytest.skip("benchmarks/ is not beside tests/")
    storage = tmp_path / "benchmarks-storage"
    saved = _run(storage, "--benchmark-save=baseline")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert len(list(storage.glob("*/0001_baseline.json"))) == 1, saved.stdout
    return storage


def test_the_gate_passes_an_unchanged_build(baseline: Path) -> None:
    result = _run(baseline, "--benchmark-compare", f"--benchmark-compare-fail={THRESHOLD}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Comparing against benchmarks from" in result.stdout + result.stderr
    assert "Performance has regressed" not in result.stdout + result.stderr


def test_the_gate_fails_a_deliberately_slowed_build(baseline: Path) -> None:
    result = _run(baseline, "--benchmark-compare", f"--benchmark-compare-fail={THRESHOLD}", slowdown="0.002")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Performance has regressed" in output
    assert "test_codec[parse-store-sample]" in output
    assert "PercentageRegressionCheck" in output
