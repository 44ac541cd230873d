"""pytest-orch: options, marker, header, summary and fixtures.  The ``pytest11`` entry point.

Every option is a flag ``--orch-X``, an ini key ``orch_X`` and an environment variable ``ORCH_X``; the flag wins
over the environment, which wins over the ini file, which wins over the default.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from . import options as _options
from .adapter import load_factory
from .artifacts import write_artifacts
from .checks import OrchViolation, Report, check_history, describe_errors, read_final
from .conformance import verdict_for
from .history import History
from .options import OrchOptions, orch_args
from .replay import Invocation, replay_command, set_current_test, set_invocation
from .spec import Spec, spec_of
from .stateful import register_profiles, select_profile
from .swarm import SwarmHandle, Workload, run_swarm
from .tmux import QUIET_AGENT_COMMAND, kill_server, live_sessions, private_env

# At import, before Hypothesis's own plugin reads --hypothesis-profile: the profiles dev, ci and soak.
register_profiles()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small: it must be at least 1")
    return value


def _concurrency(text: str) -> int:
    value = _positive_int(text)
    if value > 256:
        raise argparse.ArgumentTypeError(f"{value} processes is more than the 256 the harness will start")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (the seed is printed in the header"
                                         " of every run; pass that)") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive, finite number of seconds")
    return value


def _chaos(text: str) -> str:
    from .chaos import parse_chaos

    try:
        return str(parse_chaos(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _schedule(text: str) -> str:
    from .schedule import parse_schedule

    try:
        return parse_schedule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _directory(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not a directory")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return str(path)


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not yes or no (1/0, true/false, on/off)")


def _impl(text: str) -> str:
    if text in ("reference", "legacy"):
        return text
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        raise argparse.ArgumentTypeError(f"{text!r}: use 'reference', 'legacy' or 'package.module:factory'")
    return text


@dataclass(frozen=True)
class _Option:
    name: str
    convert: Callable[[str], Any]
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--orch-" + self.name

    @property
    def ini(self) -> str:
        return "orch_" + self.name

    @property
    def env(self) -> str:
        return "ORCH_" + self.name.upper()


#: One row per swarm test, for the terminal summary (filled from reports, so xdist workers' rows arrive too).
_rows: list[dict[str, Any]] = []

_OPTIONS = (
    _Option("concurrency", _concurrency, 4, "processes per swarm (default 4)"),
    _Option("impl", _impl, "reference",
            "the registry under test: 'reference', 'legacy' or 'package.module:factory' (default reference)"),
    _Option("ops", _positive_int, 50, "operations per process (default 50)"),
    _Option("seed", _seed, None, "seed of the workloads (default: random, printed in the header; replays a run)"),
    _Option("timeout", _seconds, 300.0, "seconds a swarm may run before its workers' stacks are dumped and they"
                                        " are killed (default 300)"),
    _Option("chaos", _chaos, None, "inject faults into every swarm: 'sigkill' or 'sigkill=N' kills up to N (3)"
                                   " random workers at random moments (default: none)"),
    _Option("schedule", _schedule, None, "take turns at every file-system event: 'random' or 'pct[:DEPTH]', seeded"
                                         " by --orch-seed (default: none, free-running)"),
    _Option("report", _directory, None, "write each failing swarm's history (JSON Lines), final documents, full"
                                        " report and HTML timeline under this directory (default: none)"),
    _Option("report_all", _flag, False, "with --orch-report, write every swarm, not only failing ones"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("orch", "pytest-orch: run N real processes against an agent registry")
    for opt in _OPTIONS:
        if opt.default is False:  # a flag: --orch-X alone; ini and env take yes/no
            group.addoption(opt.flag.replace("_", "-"), action="store_const", const=True, default=None,
                            dest="orch_" + opt.name, help=f"{opt.help}; also ini {opt.ini} and env {opt.env}")
        else:
            group.addoption(opt.flag, type=opt.convert, default=None, dest="orch_" + opt.name,
                            help=f"{opt.help}; also ini {opt.ini} and env {opt.env}")
        parser.addini(opt.ini, f"pytest-orch: {opt.help}", default=None)


def _resolve(config: pytest.Config) -> OrchOptions:
    values: dict[str, Any] = {}
    for opt in _OPTIONS:
        value = config.getoption("orch_" + opt.name)
        if value is None:
            for source, raw in ((f"environment variable {opt.env}", os.environ.get(opt.env)),
                                (f"ini option {opt.ini}", config.getini(opt.ini))):
                if raw not in (None, ""):
                    try:
                        value = opt.convert(str(raw).strip())
                    except argparse.ArgumentTypeError as exc:
                        raise pytest.UsageError(f"{source}={raw!r}: {exc}") from None
                    break
        values[opt.name] = opt.default if value is None else value
    if values["seed"] is None:
        workerinput = getattr(config, "workerinput", None)  # under xdist, every worker uses the controller's seed
        values["seed"] = int(workerinput["orch_seed"]) if workerinput else random.randrange(10**9)
    try:
        load_factory(values["impl"])
    except ValueError as exc:
        raise pytest.UsageError(f"--orch-impl: {exc}") from None
    return OrchOptions(**values)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "orch(concurrency=None, ops=None, timeout=None): override --orch-concurrency, --orch-ops and"
                   " --orch-timeout for the swarms of this test")
    options = _resolve(config)
    config.stash[_SAVED] = (_options.current(), _options.progress_writer())  # a nested (pytester) session restores them
    _options.set_current(options)
    set_invocation(Invocation(bool(config.getoption("pyargs", False)), config.invocation_params.dir,
                              config.rootpath))
    select_profile(config)  # ``ci`` when $CI is set and no --hypothesis-profile was given
    _options.set_progress(_progress_writer(config))
    _rows.clear()


#: What pytest_configure replaced, put back by pytest_unconfigure.
_SAVED = pytest.StashKey[tuple[OrchOptions, Callable[[str], None]]]()


def pytest_unconfigure(config: pytest.Config) -> None:
    saved = config.stash.get(_SAVED, None)
    if saved is not None:
        _options.set_current(saved[0])
        _options.set_progress(saved[1])


def _progress_writer(config: pytest.Config) -> Callable[[str], None]:
    """Write a line to the terminal while a test runs (output is captured then), as live logging does."""

    def write(line: str) -> None:
        terminal = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if terminal is None or config.get_verbosity() < 0:
            return
        # Progress must never fail a test: a closed terminal (a session that ended) shows nothing.
        with contextlib.suppress(ValueError, OSError), (capture.global_and_fixture_disabled() if capture is not None
                                                         else contextlib.nullcontext()):
            terminal.write_line(f"  {line}")

    return write


def pytest_runtest_setup(item: pytest.Item) -> None:
    set_current_test(item.path, item.nodeid.split("::", 1)[1] if "::" in item.nodeid else item.name)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:  # pragma: no cover - xdist's hook, called only under xdist
    node.workerinput["orch_seed"] = _options.current().seed


def pytest_report_header(config: pytest.Config) -> str:
    o = _options.current()
    chaos = f", chaos={o.chaos}" if o.chaos else ""
    chaos += f", schedule={o.schedule}" if o.schedule else ""
    return (f"orch: impl={o.impl}, concurrency={o.concurrency}, ops={o.ops}, seed={o.seed}, timeout={o.timeout:g}s"
            + chaos)


# --------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def orch_options(request: pytest.FixtureRequest) -> OrchOptions:
    """The options in force for this test: the command line, environment or ini, then its ``orch`` marker."""
    options = _options.current()
    marker = request.node.get_closest_marker("orch")
    if marker is None:
        return options
    unknown = set(marker.kwargs) - {"concurrency", "ops", "timeout"}
    if unknown or marker.args:
        raise pytest.UsageError(f"{request.node.nodeid}: @pytest.mark.orch takes concurrency=, ops= and timeout=,"
                                f" not {sorted(unknown) or marker.args}")
    converters: dict[str, Callable[[str], Any]] = {"concurrency": _concurrency, "ops": _positive_int,
                                                   "timeout": _seconds}
    changes: dict[str, Any] = {}
    for key, value in marker.kwargs.items():
        try:
            changes[key] = converters[key](str(value))
        except argparse.ArgumentTypeError as exc:
            raise pytest.UsageError(f"{request.node.nodeid}: @pytest.mark.orch({key}={value!r}): {exc}") from None
    return replace(options, **changes)


@pytest.fixture
def orch_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh workspace directory, and a private tmux server for this test and every process it starts."""
    tmux_dir = Path(tempfile.mkdtemp(prefix="orch-tmux-"))  # short: a socket path may not exceed ~100 bytes
    for key, value in private_env(tmux_dir).items():
        if value:
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key, raising=False)
    if not os.environ.get("ORCH_AGENT_COMMAND"):
        monkeypatch.setenv("ORCH_AGENT_COMMAND", QUIET_AGENT_COMMAND)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    try:
        yield workspace
    finally:
        kill_server(tmux_dir)
        shutil.rmtree(tmux_dir, ignore_errors=True)


@pytest.fixture
def orch_registry(orch_workspace: Path, orch_options: OrchOptions) -> Any:
    """The adapter of the selected implementation, opened in the test process."""
    return load_factory(orch_options.impl)(orch_workspace)


class Swarm:
    """Call it with a workload to run it in N processes; it returns the History.  See :func:`run_swarm`."""

    def __init__(self, request: pytest.FixtureRequest, workspace: Path, registry: Any, options: OrchOptions) -> None:
        self.request = request
        self.workspace = workspace
        self.registry = registry
        self.options = options
        self.histories: list[History] = []
        self.sessions_before: frozenset[str] = frozenset()

    def __call__(self, workload: Workload, *, tasks: list[str] | None = None, concurrency: int | None = None,
                 ops: int | None = None, shared: dict[str, Any] | None = None,
                 during: Callable[[SwarmHandle], None] | None = None) -> History:
        __tracebackhide__ = True
        o = self.options
        if during is None and o.chaos and not o.schedule:  # scheduled: a kill is a step of the schedule
            from .chaos import parse_chaos, random_sigkills

            during = random_sigkills(f"{o.seed}:{self.request.node.nodeid}:{len(self.histories)}",
                                     parse_chaos(o.chaos).sigkills)
        initial = {t: self.registry.read_task(t) for t in tasks or []}
        self.sessions_before = frozenset(live_sessions())
        schedule = None
        if o.schedule:
            from .schedule import for_swarm

            schedule = for_swarm(self, workload, tasks=tasks, concurrency=concurrency or o.concurrency,
                                 ops=ops or o.ops, shared=shared, initial=initial)
        history = run_swarm(o.impl, self.workspace, workload, concurrency=concurrency or o.concurrency,
                            ops=ops or o.ops, seed=o.seed, timeout=o.timeout, label=self.request.node.nodeid,
                            shared=shared, initial=initial, during=during, schedule=schedule)
        self.histories.append(history)
        self.request.node.user_properties.append(("orch_swarm", {
            "processes": history.concurrency, "ops": history.ops_per_process, "ok": history.count("ok"),
            "fail": history.count("fail"), "info": history.count("info"),
            "ops_per_s": round(history.throughput, 1), "overlap": round(history.overlap(), 3),
            "errors": describe_errors(history.calls)}))
        return history

    def replay(self) -> str:
        """The command that runs this test again with this seed (see :mod:`pytest_orch.replay`)."""
        return replay_command(self.request.node.path, self.request.node.nodeid.split("::", 1)[1],
                              orch_args(self.options))

    def check(self, history: History, *, tasks: list[str] | None = None, checks: list[str] | None = None,
              reopen: bool = False, raise_on_problems: bool = True, exercises: Sequence[str] = (),
              at_least: int = 0) -> Report:
        """Run the checks on *history* and the final documents.

        The documents are read through the test's adapter, opened before the swarm, so that a registry which
        repairs itself when opened cannot hide what its operations did.  After a crash, pass *reopen* to read them
        the way a process started afterwards would (a swarm whose workers were SIGKILLed always is).  *exercises*
        names the operations the test is about: each must have returned ok at least once (and reconcile must have
        reaped), and at least *at_least* operations must have succeeded, or the run is ``inconclusive``.  Raises
        OrchViolation (an AssertionError) whose message is the report, unless *raise_on_problems* is False.
        """
        __tracebackhide__ = True
        crashed = any(op.name == "sigkill" for op in history.ops)
        reader = load_factory(self.options.impl)(self.workspace) if reopen or crashed else self.registry
        clock = (time.time(), time.monotonic_ns())
        final = read_final(reader, tasks or history.task_ids(), sessions=live_sessions(),
                           sessions_before=self.sessions_before, clock=clock)
        report = check_history(history, final, checks=checks, replay=self.replay(), exercises=exercises,
                               at_least=at_least)
        if self.options.report and (self.options.report_all or not report.ok):
            folder = write_artifacts(Path(self.options.report), self.request.node.nodeid,
                                     self.histories.index(history) if history in self.histories else 0,
                                     history, final, report)
            report = replace(report, notes=(*report.notes, f"history, documents, full report and timeline.html"
                                                           f" written to {folder}"))
        if history.schedule is not None:  # more schedules when it passed, the failure shrunk when it failed
            from .schedule import explain

            report = explain(self, report, checks=checks, exercises=exercises, at_least=at_least)
        self.request.node.user_properties.append(("orch_check", {
            "violations": len(report.problems), "checks": sorted({p.check for p in report.problems}),
            "notes": list(report.notes)}))
        if raise_on_problems and not report.ok:
            raise OrchViolation(report, full=self.request.config.get_verbosity() >= 2)
        return report


@pytest.fixture
def orch_swarm(request: pytest.FixtureRequest, orch_workspace: Path, orch_registry: Any,
               orch_options: OrchOptions) -> Swarm:
    """Run a workload across N real processes started together; returns a History.  ``.check(history)`` checks.

    Before the first swarm of a session the registry's contract is checked (:mod:`pytest_orch.conformance`): when
    it does not do what its declared rules say, the test is skipped with the differences, instead of reporting
    them as lost updates.
    """
    require_contract(orch_options.impl)
    return Swarm(request, orch_workspace, orch_registry, orch_options)


def require_contract(impl: str) -> None:
    """Skip the calling test when *impl* fails its conformance run (run once per process)."""
    __tracebackhide__ = True
    verdict = verdict_for(impl)
    if not verdict.rules_hold:
        first = str(verdict.mismatches[0]) if verdict.mismatches else verdict.error
        more = f" (and {len(verdict.mismatches) - 1} more: see test_the_registry_does_what_its_rules_say)" \
            if len(verdict.mismatches) > 1 else ""
        pytest.skip(f"the registry does not follow its declared rules, so its concurrent tests would report the"
                    f" difference as lost updates: [contract] {first}{more}")


@pytest.fixture
def orch_spec(orch_registry: Any) -> Spec:
    """The specification the registry under test is judged by: its declared ``rules``, ``promises`` and ``spec``."""
    return spec_of(orch_registry)


@pytest.fixture
def orch_chaos(request: pytest.FixtureRequest, orch_options: OrchOptions) -> Any:
    """Faults for this test (see :mod:`pytest_orch.chaos`), seeded from ``--orch-seed`` and the test's id."""
    from .chaos import Chaos

    return Chaos(f"{orch_options.seed}:{request.node.nodeid}")


@pytest.fixture
def orch_check(orch_swarm: Swarm) -> Callable[..., Report]:
    """``orch_check(history)``: run every check; raise OrchViolation (an AssertionError) with the report."""
    return orch_swarm.check


# --------------------------------------------------------------------------------------------------------------------
# The summary


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    swarms: list[dict[str, Any]] = [v for k, v in report.user_properties if k == "orch_swarm"]  # type: ignore[misc]
    if not swarms:
        return
    checks: list[dict[str, Any]] = [v for k, v in report.user_properties if k == "orch_check"]  # type: ignore[misc]
    row = {"test": report.nodeid, "outcome": report.outcome, "violations": sum(c["violations"] for c in checks),
           "checked": bool(checks)}
    for key in ("ok", "fail", "info"):
        row[key] = sum(s[key] for s in swarms)
    row["processes"] = max(s["processes"] for s in swarms)
    row["ops"] = max(s["ops"] for s in swarms)
    row["swarms"] = len(swarms)
    row["ops_per_s"] = sum(s["ops_per_s"] for s in swarms) / len(swarms)
    row["overlap"] = min(s["overlap"] for s in swarms)
    row["notes"] = [n for c in checks for n in c.get("notes", [])]
    row["errors"] = [e for s in swarms for e in s.get("errors", [])]
    _rows.append(row)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _rows:
        return
    tr = terminalreporter
    tr.write_sep("-", "orch")
    width = min(max(len(r["test"]) for r in _rows), 70)
    tr.write_line(f"{'test':<{width}}  {'procs x ops':>11}  {'ok':>5} {'fail':>5} {'info':>5}  {'ops/s':>7}"
                  f"  {'overlap':>7}  violations")
    for r in _rows:
        name = r["test"] if len(r["test"]) <= width else "…" + r["test"][-width + 1:]
        violations = str(r["violations"]) if r["checked"] else "-"
        tr.write_line(f"{name:<{width}}  {r['processes']:>4} x {r['ops']:<4}  {r['ok']:>5} {r['fail']:>5}"
                      f" {r['info']:>5}  {r['ops_per_s']:>7.0f}  {r['overlap']:>7.0%}  {violations}")
        for error in r["errors"]:
            tr.write_line(f"  {error}")
    total = {k: sum(r[k] for r in _rows) for k in ("ok", "fail", "info", "violations")}
    tr.write_line(f"{'total: ' + str(len(_rows)) + ' swarm tests':<{width}}  {'':>11}  {total['ok']:>5}"
                  f" {total['fail']:>5} {total['info']:>5}  {'':>7}  {'':>7}  {total['violations']}")
    for note in dict.fromkeys(n for r in _rows for n in r["notes"]):
        tr.write_line(f"note: {note}")
