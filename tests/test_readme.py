"""The README's adapter examples run as written: its own-registry example and the declaration for a registry shaped
unlike the reference, each through the whole ready-made suite at concurrency 10."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def _block(marker: str) -> str:
    """The Python code block that follows ``<!-- marker -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found, f"README.md has no python block after <!-- {marker} -->"
    return found.group(1)


def _suite(pytester: pytest.Pytester, impl: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("--pyargs", "pytest_orch.suite", f"--orch-impl={impl}",
                                         "--orch-concurrency=10", "--hypothesis-profile=dev", "-p", "no:cacheprovider",
                                         "-rs")


def test_the_readme_registry_passes_the_whole_suite_with_the_rules_it_declares(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(myorch_testing=_block("readme-registry"))
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    result = _suite(pytester, "myorch_testing:adapter")
    text = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, text[-4000:]
    assert result.parseoutcomes()["passed"] >= 12, text[-2000:]
    assert "Rules(kill_of_terminal='ignored', reaped_to='completed', counters=False, hierarchy=False)" in text


def test_the_readme_declaration_for_a_registry_unlike_the_reference_passes_the_whole_suite(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    body = textwrap.indent(_block("readme-projects-rules"), "    ")
    pytester.makepyfile(readme_projects="from correct_registries import Projects\nfrom pytest_orch import Rules\n\n\n"
                                        f"class Declared(Projects):\n{body}\n\n"
                                        "def adapter(workspace):\n    return Declared(workspace)\n")
    monkeypatch.setenv("PYTHONPATH", f"{pytester.path}:{TESTS}")
    result = _suite(pytester, "readme_projects:adapter")
    text = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, text[-4000:]
    assert result.parseoutcomes()["passed"] >= 12, text[-2000:]
