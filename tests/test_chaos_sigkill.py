"""Random SIGKILLs of the workers of a swarm: the reference loses nothing acknowledged and corrupts nothing; legacy
fails the chaos suite, and the report lists the faults in time order next to the operations they cut short.

By default the reference runs 3 seeded runs; with ORCH_SOAK=1 (``tox -e soak``) it runs the 20 the issue asks for.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_orch.chaos import Chaos
from pytest_orch.checks import Report
from pytest_orch.history import History
from pytest_orch.swarm import Worker

RUNS = 20 if os.environ.get("ORCH_SOAK") else 3
WORKING = ("running", "working", "blocked")
FAULT_LINE = re.compile(r"^E?\s+(-?\d+\.\d) ms  (.*)$")  # pytest prefixes an assertion's message with "E"


def _in_time_order(report: Report) -> list[tuple[float, str]]:
    lines = [FAULT_LINE.match(line) for line in report.faults()]
    parsed = [(float(m.group(1)), m.group(2)) for m in lines if m is not None]
    assert len(parsed) == len(lines), report.faults()
    return parsed


@pytest.mark.parametrize("run", range(RUNS))
def test_the_reference_loses_nothing_and_corrupts_nothing_under_random_sigkills_at_concurrency_10(
        orch_registry: Any, orch_swarm: Any, orch_chaos: Chaos, tmp_path: Path, run: int) -> None:
    task = orch_registry.create_task(f"sigkill run {run}", max_agents=1000, max_concurrent=1000, max_depth=4)
    seeds = [orch_registry.deploy(task, f"seed{i}") for i in range(3)]
    stop = tmp_path / "kills-done"

    def work(w: Worker) -> None:
        known = list(seeds)
        for i in itertools.count():  # at least w.ops operations, and on until the kills are done
            if i >= w.ops and stop.exists():
                return
            roll = w.rng.random()
            if roll < 0.3:
                agent = w.registry.deploy(task, f"p{w.process}-{i}", w.rng.choice(["orchestrator", *known[-3:]]))
                if agent is not None:
                    known.append(agent)
            elif roll < 0.75:
                status = w.rng.choice([*WORKING, *WORKING, "completed", "error"])
                w.registry.update(task, w.rng.choice(known), status, w.rng.randrange(101))
            elif roll < 0.85:
                w.registry.kill(task, w.rng.choice(known))
            elif roll < 0.9:
                w.kill_session(f"agent_{w.rng.choice(seeds)}")
                w.registry.reconcile(task)
            else:
                w.registry.reconcile(task)

    history: History = orch_swarm(work, tasks=[task], concurrency=10, ops=8,
                                  during=orch_chaos.sigkills(3, stop=stop, first_after=0.05, spread=0.3))
    report = orch_swarm.check(history)  # every invariant, every ok op present, counters within what info allows

    kills = [op for op in history.ops if op.name == "sigkill"]
    assert len(kills) == 3, "the chaos did not kill 3 workers while they worked"
    assert all(history.worker_exits[op.args["process"]] == -9 for op in kills), history.worker_exits
    final = orch_registry.read_task(task)
    deploys = [op for op in history.calls if op.name == "deploy"]
    ok = sum(1 for op in deploys if op.outcome == "ok")
    unknown = sum(1 for op in deploys if op.outcome == "info")
    assert len(seeds) + ok <= final["total_spawned"] <= len(seeds) + ok + unknown
    faults = _in_time_order(report)
    assert [t for t, _ in faults] == sorted(t for t, _ in faults)
    assert sum(1 for _, what in faults if what.startswith("SIGKILL p")) == 3
    assert any(re.match(r"SIGKILL p\d+: cut short (deploy|update|kill|reconcile)\(", what) for _, what in faults), \
        faults  # each kill is aimed at a worker in the middle of an operation
    assert "faults injected, in time order, and the operations they hit:" in report.render()
    print(f"run {run}: {len(history.calls)} ops ({history.count('ok')} ok, {history.count('fail')} fail,"
          f" {history.count('info')} info), {len(kills)} SIGKILLs:"
          f" {'; '.join(what for _, what in faults if what.startswith('SIGKILL'))}")


def _legacy_chaos_run(pytester: pytest.Pytester) -> str:
    """The suite against legacy under SIGKILL chaos, checked as every run must be; returns its output."""
    result = pytester.runpytest_subprocess("--pyargs", "pytest_orch.suite", "--orch-impl=legacy",
                                           "--orch-chaos=sigkill", "--orch-concurrency=10", "-k", "not stateful",
                                           "-p", "no:cacheprovider")
    text = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, text[-3000:]
    assert result.parseoutcomes().get("failed", 0) >= 3, text[-3000:]
    assert "orch: impl=legacy, concurrency=10, ops=50, seed=" in text
    assert ", chaos=sigkill=3" in text
    assert re.search(r"\[(corruption|lost_update|lost_insert)\] ", text), text[-3000:]
    # Every failure report lists the faults injected, in time order, each next to the operation it cut short.
    blocks = text.split("faults injected, in time order, and the operations they hit:")[1:]
    assert blocks, text[-3000:]
    for block in blocks:
        lines = []
        for line in block.splitlines()[1:]:
            match = FAULT_LINE.match(line)
            if match is None:
                break
            lines.append((float(match.group(1)), match.group(2)))
        assert lines, block[:2000]
        assert [t for t, _ in lines] == sorted(t for t, _ in lines), block[:2000]
        for _, what in lines:
            assert re.fullmatch(r"SIGKILL p\d+(: cut short \w+\(.*\)| between operations)|tmux_kill\(.*\) by p\d+",
                                what), what
    assert "replay: pytest " in text
    return text


def test_legacy_fails_the_chaos_suite_with_corruption_or_lost_updates_and_lists_the_faults_in_time_order(
        pytester: pytest.Pytester) -> None:
    # Legacy's operations fail in microseconds, so its workers may be done before a kill lands: a run whose failure
    # reports show no kill that landed (seen once in a full-suite run) is followed by another, up to three.
    for _ in range(3):
        text = _legacy_chaos_run(pytester)
        if re.search(r"SIGKILL p\d+(: cut short| between operations)", text):
            break
    assert re.search(r"SIGKILL p\d+(: cut short| between operations)", text), text[-3000:]
    assert "--orch-chaos=sigkill=3" in text
