"""``--orch-report=DIR``: each failing swarm's history, documents, full report and a self-contained HTML timeline,
the page checked in a real headless Chromium (``.ci/run`` installs it when missing)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def legacy_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifacts of legacy failing the distinct-deploys test at concurrency 10 (up to three runs to race)."""
    out = tmp_path_factory.mktemp("orch-report")
    for _ in range(3):
        result = subprocess.run(["pytest", "--pyargs", "pytest_orch.suite", "--orch-impl=legacy",
                                 "--orch-concurrency=10", "-k", "distinct_types", "-p", "no:cacheprovider",
                                 f"--orch-report={out}", "-q"], capture_output=True, text=True, check=False,
                                cwd=out, env=_env())
        if result.returncode == 1:
            break
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"written to {out}" in result.stdout
    folders = sorted(out.glob("*/swarm-*"))
    assert len(folders) == 1, folders
    return folders[0]


def _env() -> dict[str, str]:
    import os
    import sys

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def test_the_artifacts_hold_the_history_the_documents_and_the_whole_report(legacy_report: Path) -> None:
    assert sorted(p.name for p in legacy_report.iterdir()) == ["final.json", "history.jsonl", "report.txt",
                                                              "timeline.html"]
    ops = [json.loads(line) for line in (legacy_report / "history.jsonl").read_text().splitlines()]
    assert len(ops) == 80  # 10 processes x 8 deploys, every one
    assert {op["op"] for op in ops} == {"deploy"}
    assert all({"process", "args", "invoke_ns", "complete_ns", "outcome", "error"} <= set(op) for op in ops)
    final = json.loads((legacy_report / "final.json").read_text())
    assert final["tasks"]
    assert "global" in final
    report = (legacy_report / "report.txt").read_text()
    assert report.startswith("orch: ")
    assert "... and" not in report  # nothing truncated
    assert "replay: pytest" in report


def test_the_timeline_page_needs_no_network(legacy_report: Path) -> None:
    page = (legacy_report / "timeline.html").read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)
    assert "<script>" in page
    assert "const D = " in page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_the_timeline_shows_a_lane_per_process_and_highlights_the_problems_in_a_real_browser(
        legacy_report: Path, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    page = (legacy_report / "timeline.html").as_uri()
    flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True).stdout
    lanes = re.findall(r'<rect class="lane" data-process="(-?\d+)"', dom)
    assert sorted(int(p) for p in lanes) == list(range(10))  # one lane per worker, drawn by the page's script
    assert len(re.findall(r'class="bar [^"]*"', dom)) == 80
    assert re.search(r'class="bar (ok|info|fail)[^"]*problem-op', dom)  # the ops of a problem are highlighted
    assert re.search(r'class="problem" data-problem="0"><span class="check">\[(lost_insert|torn_read|[a-z_]+)\]',
                     dom)
    shot = tmp_path / "timeline.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,900", page], capture_output=True,
                   timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, legacy_report / "timeline.png")  # kept beside the page, for a person to look at
