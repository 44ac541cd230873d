"""Fault injection: real SIGKILLs, crashes at the points of the write protocol, a lock holder that stalls, torn and
corrupt files, a full disk, tmux sessions and servers killed behind the registry's back.  Every fault is seeded,
recorded as a fault operation, and listed in the report next to the operations it hit.

``--orch-chaos=sigkill`` (or ``sigkill=N`` for at most N kills per swarm) makes every ``orch_swarm`` run kill
random workers at random moments; the ``orch_chaos`` fixture (:class:`Chaos`) gives a test every fault by hand::

    def test_deploys_survive_kills(orch_registry, orch_swarm, orch_chaos):
        history = orch_swarm(work, during=orch_chaos.sigkills(3))
        orch_swarm.check(history)

Faults injected outside a swarm go on the chaos object's own :class:`Tape`; ``orch_chaos.merge(history)`` lays them
into a swarm's History in time order, ``orch_chaos.check(adapter)`` checks what the tape alone recorded.

Crash points (:meth:`Chaos.crash_points`) reach into the reference registry's write protocol through
:func:`registry.store.set_crash_hook`; a registry of one's own gets only the faults that come from outside: SIGKILLs,
stalls it cannot see, corrupt files, a full disk it cannot see, and tmux.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import secrets
import shutil
import signal
import stat
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import multiprocess  # type: ignore[import-untyped]

from .adapter import ReferenceAdapter
from .checks import CHECKS, Final, OrchViolation, Report, check_history, read_final
from .errors import HarnessError
from .history import HARNESS, History, Op, Recorder, read_events
from .swarm import SwarmHandle, Worker
from .tmux import QUIET_AGENT_COMMAND, private_server

__all__ = [
    "BROKEN_TMUX",
    "CHECKS_WITHOUT_CONCURRENCY",
    "CORRUPTIONS",
    "CRASH_EXIT",
    "STALL_POINTS",
    "Chaos",
    "ChaosError",
    "ChaosSpec",
    "CrashExploration",
    "CrashRun",
    "CrashSite",
    "ImpatientReference",
    "StalledHolder",
    "Tape",
    "explore_crash_points",
    "file_label",
    "parse_chaos",
    "random_sigkills",
]

#: The exit status of a child that crashed at the crash point it was told to: tells a crash from any other death.
CRASH_EXIT = 86
#: The ways :meth:`Chaos.corrupt` can break a registry file.
CORRUPTIONS = ("truncated", "invalid_utf8", "wrong_shape", "empty", "missing")
#: The points of the write protocol where a lock holder can stall before anything is renamed into place.
STALL_POINTS = ("holding_lock", "before_temp_write", "after_temp_write", "after_fsync")
#: The checks that make sense outside a swarm (a crash run or a test's own calls are not meant to overlap).
CHECKS_WITHOUT_CONCURRENCY = tuple(name for name in CHECKS if name != "real_concurrency")


class ChaosError(HarnessError):
    """A fault could not be injected as asked (the harness's problem, not the registry's)."""


# --------------------------------------------------------------------------------------------------------------------
# --orch-chaos and random SIGKILLs


@dataclass(frozen=True)
class ChaosSpec:
    """What ``--orch-chaos`` asked for."""

    sigkills: int = 0  # at most this many workers SIGKILLed per swarm

    def __str__(self) -> str:
        return f"sigkill={self.sigkills}" if self.sigkills else "off"


def parse_chaos(text: str) -> ChaosSpec:
    """``sigkill`` (at most 3 kills a swarm) or ``sigkill=N``.  ValueError for anything else."""
    kind, _, count = text.strip().partition("=")
    if kind != "sigkill":
        raise ValueError(f"{text!r}: the faults a swarm can be given are 'sigkill' or 'sigkill=N'")
    if not count:
        return ChaosSpec(sigkills=3)
    try:
        kills = int(count)
    except ValueError:
        raise ValueError(f"{text!r}: N in sigkill=N must be a whole number") from None
    if kills < 1:
        raise ValueError(f"{text!r}: N in sigkill=N must be at least 1")
    return ChaosSpec(sigkills=kills)


def random_sigkills(seed: str, kills: int, *, first_after: float = 0.05, spread: float = 0.6,
                    keep_alive: int = 1, stop: Path | None = None) -> Callable[[SwarmHandle], None]:
    """A ``during`` callback that SIGKILLs up to *kills* random workers at random moments, seeded by *seed*.

    Kills come *first_after* to *first_after* + *spread* seconds apart, each aimed, if it can be within 50 ms, at a
    worker in the middle of an operation (a kill between operations tests little); at least *keep_alive* workers
    are spared so the swarm still does work.  Each kill is recorded as a fault operation.  With *stop*, the file is
    created once the kills are done (or given up), so a workload that runs until it exists is sure to be hit while
    working.
    """
    rng = random.Random(f"chaos:{seed}")

    def inject(handle: SwarmHandle) -> None:
        try:
            for _ in range(kills):
                if handle.done.wait(first_after + rng.random() * spread):
                    return
                alive = handle.alive()
                if len(alive) <= keep_alive:
                    return
                deadline = time.monotonic() + 0.05
                while not (busy := handle.in_flight()) and time.monotonic() < deadline:
                    time.sleep(0.0005)
                handle.sigkill(rng.choice(busy or alive))
                time.sleep(0)  # let the recorder's lines reach the file in order
        finally:
            if stop is not None:
                stop.touch()

    return inject


# --------------------------------------------------------------------------------------------------------------------
# A tape: operations and faults recorded outside a swarm


def file_label(path: str | Path) -> str:
    """``task registry``, ``global registry``, or the file's name: how reports name a registry file."""
    from registry.model import GLOBAL_FILE, TASK_FILE

    name = Path(path).name
    return {TASK_FILE: "task registry", GLOBAL_FILE: "global registry"}.get(name, name)


class Tape:
    """Operations and faults recorded by the test process and the children chaos starts, outside any swarm.

    Process numbers start at *first_process* so that a tape merged into a swarm's History (workers 0..N-1) does not
    collide with the workers; faults injected by the test process itself are the harness's (-1).
    """

    def __init__(self, directory: Path, *, first_process: int = 100, seed: int = 0, impl: str = "reference") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.first_process = first_process
        self.seed = seed
        self.impl = impl
        self._recorders: dict[tuple[int, int], Recorder] = {}
        self._next = first_process + 1

    def recorder(self, process: int) -> Recorder:
        """The recorder of *process* in this OS process (a forked child gets a file of its own)."""
        key = (os.getpid(), process)
        if key not in self._recorders:
            self._recorders[key] = Recorder(self.directory / f"p{process}-{os.getpid()}.jsonl", process)
        return self._recorders[key]

    def new_process(self) -> int:
        """A process number for a child not yet started."""
        number, self._next = self._next, self._next + 1
        return number

    def worker(self, adapter: Any, process: int | None = None, *, ops: int = 0,
               shared: dict[str, Any] | None = None) -> Worker:
        """A recorded :class:`~pytest_orch.swarm.Worker` over *adapter* (default: the test process's number)."""
        number = self.first_process if process is None else process
        return Worker(number, ops, f"{self.seed}:tape:{number}", Path(self.directory), adapter,
                      self.recorder(number), dict(shared or {}))

    def fault(self, name: str, **args: Any) -> None:
        """Record an instantaneous fault injected by the test process."""
        recorder = self.recorder(HARNESS)
        recorder.complete(recorder.invoke(name, args, fault=True), "ok")

    @contextlib.contextmanager
    def lasting_fault(self, name: str, **args: Any) -> Iterator[None]:
        """Record a fault that lasts for the block: invoked when it starts, completed when it ends."""
        recorder = self.recorder(HARNESS)
        index = recorder.invoke(name, args, fault=True)
        try:
            yield
        finally:
            recorder.complete(index, "ok")

    def ops(self) -> list[Op]:
        return read_events(sorted(self.directory.glob("p*.jsonl")))

    def history(self) -> History:
        """Everything recorded so far, as a History the checks and the report read."""
        ops = self.ops()
        start = min((op.invoke_ns for op in ops), default=time.monotonic_ns())
        end = max([start, *(op.complete_ns or op.invoke_ns for op in ops)])
        processes = {op.process for op in ops if op.process != HARNESS}
        return History(ops=ops, concurrency=max(len(processes), 1), ops_per_process=0, seed=self.seed,
                       impl=self.impl, start_ns=start, end_ns=end)

    def merge(self, history: History) -> History:
        """*history* with this tape's operations and faults laid in, in time order."""
        ops = sorted([*history.ops, *self.ops()], key=lambda op: (op.invoke_ns, op.process, op.index))
        start = min([history.start_ns, *(op.invoke_ns for op in ops)])
        end = max([history.end_ns, *(op.complete_ns or op.invoke_ns for op in ops)])
        return replace(history, ops=ops, start_ns=start, end_ns=end)

    def close(self) -> None:
        for key, recorder in list(self._recorders.items()):
            if key[0] == os.getpid():
                recorder.close()


def _leading_int(seed: str) -> int:
    head = seed.split(":", 1)[0]
    return int(head) if head.lstrip("-").isdigit() else 0


def _fork(target: Callable[[], None]) -> Any:
    """Start *target* in a forked child (the ``multiprocess`` package, so *target* may be a closure)."""
    process = multiprocess.get_context("fork").Process(target=target, daemon=False)
    process.start()
    return process


def _reap(process: Any, timeout: float) -> int | None:
    process.join(timeout)
    if process.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        raise ChaosError(f"the chaos child {process.pid} was still running after {timeout:g} s and was killed")
    code: int | None = process.exitcode
    return code


# --------------------------------------------------------------------------------------------------------------------
# Crash points of the reference write protocol


@dataclass(frozen=True)
class CrashSite:
    """The *index*-th crash point an operation passes: which point, in which file."""

    index: int
    point: str
    file: str

    def __str__(self) -> str:
        return f"#{self.index} {self.point} ({self.file})"


@dataclass(frozen=True)
class CrashRun:
    """What one crash left behind."""

    site: CrashSite
    exitcode: int | None
    applied: str  # "fully", "not at all", "partly" or "unreadable"
    problems: tuple[str, ...]
    report: Report | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class CrashExploration:
    """One operation crashed at every point it passes, one run a point."""

    op: str
    sites: tuple[CrashSite, ...]
    runs: tuple[CrashRun, ...]

    @property
    def failures(self) -> list[CrashRun]:
        return [run for run in self.runs if not run.ok]

    @property
    def points(self) -> set[str]:
        return {site.point for site in self.sites}

    def render(self) -> str:
        tried = "" if len(self.runs) == len(self.sites) else f", {len(self.runs)} of them tried"
        lines = [f"{self.op} passes {len(self.sites)} crash points{tried}; a crash at {len(self.failures)} of them"
                 " broke the registry" if self.failures else
                 f"{self.op} passes {len(self.sites)} crash points{tried}; a crash at any of them left the registry"
                 " whole"]
        for run in self.runs:
            verdict = "ok" if run.ok else "BROKEN"
            lines.append(f"  {run.site!s:<48} {verdict:<6} (exit {run.exitcode}; the {self.op} was applied"
                         f" {run.applied})")
            lines += [f"      - {problem}" for problem in run.problems]
        first = next((run for run in self.runs if not run.ok and run.report is not None), None)
        if first is not None and first.report is not None:
            lines += ["", f"the report of the first broken run ({first.site}):", first.report.render()]
        return "\n".join(lines)


Setup = Callable[[Worker], dict[str, Any]]
CrashOp = Callable[[Worker, dict[str, Any]], Any]
Tolerate = Callable[[Any, dict[str, Any]], bool]
Writer = Callable[[Any, bytes], None]


class _Snapshot:
    """Every registry document of a workspace, read without healing, and what could not be read."""

    def __init__(self, base: Path) -> None:
        from registry import Registry

        reg = Registry(base, heal=False, sessions=None)
        self.tasks: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        for task_id in reg.task_ids():
            try:
                self.tasks[task_id] = reg.task_file(task_id).read()
            except Exception as exc:
                self.errors[task_id] = f"{type(exc).__name__}: {exc}"
        self.glob: dict[str, Any] | None = None
        try:
            self.glob = reg.global_file.read()
        except FileNotFoundError:
            if self.tasks or self.errors:
                self.errors["global"] = f"RegistryMissing: {reg.global_file.path} is missing"
        except Exception as exc:
            self.errors["global"] = f"{type(exc).__name__}: {exc}"

    def shape(self) -> Any:
        """What the documents say, without ids and times: equal shapes mean the same registry content."""
        if self.errors:
            return ("unreadable", tuple(sorted(self.errors)))
        tasks = []
        for doc in self.tasks.values():
            by_id = {a.get("id"): a for a in doc.get("agents", [])}

            def parent_type(agent: Mapping[str, Any], by_id: Mapping[Any, Any] = by_id) -> Any:
                parent = agent.get("parent")
                return by_id[parent].get("type") if parent in by_id else parent

            agents = sorted(((a.get("type"), a.get("status"), a.get("progress"), parent_type(a), a.get("depth"),
                              a.get("termination_reason")) for a in doc.get("agents", [])), key=repr)
            tasks.append((doc.get("task_description"), doc.get("status"), doc.get("total_spawned"),
                          doc.get("active_count"), doc.get("completed_count"), tuple(agents)))
        # A workspace with no global registry and no task reads as an empty one (Registry.read_global says so).
        glob: dict[str, Any] = self.glob if self.glob is not None else {"tasks": {}, "agents": {}, "total_tasks": 0,
                                                          "active_tasks": 0, "total_agents_spawned": 0,
                                                          "active_agents": 0}
        descriptions = {t: d.get("task_description") for t, d in self.tasks.items()}
        g_agents = sorted(((descriptions.get(v.get("task_id")), v.get("type"), v.get("status"))
                           for v in glob.get("agents", {}).values()), key=repr)
        g_tasks = sorted(((v.get("description"), v.get("status")) for v in glob.get("tasks", {}).values()), key=repr)
        totals = tuple(glob.get(k) for k in ("total_tasks", "active_tasks", "total_agents_spawned", "active_agents"))
        return tuple(sorted(tasks, key=repr)), tuple(g_tasks), tuple(g_agents), totals


def _health(base: Path) -> set[Any]:
    from registry.health import check

    return set(check(base).findings)


def _same_finding(a: Any, b: Any) -> bool:
    return bool((a.kind, a.task_id, a.agent_id, a.path) == (b.kind, b.task_id, b.agent_id, b.path))


def explore_crash_points(root: Path, op_name: str, setup: Setup, op: CrashOp, *, seed: int = 0,
                         writer: Writer | None = None, tolerate: Tolerate | None = None,
                         where: Callable[[CrashSite], bool] | None = None, timeout: float = 120.0) -> CrashExploration:
    """Crash *op* at every crash point it passes, one fresh workspace and private tmux server a point.

    First *setup* (given a recorded Worker in the test process; it returns a context for *op*) builds a workspace
    and *op* runs once in a child with a hook that lists the ``(point, file)`` it passes.  Then, for each of those
    points, a fresh workspace is built the same way and *op* runs in a forked child whose hook calls ``os._exit`` at
    exactly that point.  Afterwards the registry is opened afresh and must satisfy every check of the harness (every
    invariant, every earlier ``ok`` operation present, task and global agreeing), *op* must be applied fully or not
    at all, and ``check`` may find nothing new but what *tolerate* allows (such as the session of a crashed deploy).

    *writer*, when given, replaces ``JsonFile.write_bytes`` in the children: how to show that a naive protocol fails.
    *where* picks the crash points to crash at (default: every one the operation passes).
    """
    root.mkdir(parents=True, exist_ok=True)
    sites, after_shape = _record_sites(root / "record", op_name, setup, op, seed=seed, writer=writer,
                                       timeout=timeout)
    runs = [_crash_run(root / f"crash-{site.index}", op_name, setup, op, site, after_shape, seed=seed, writer=writer,
                       tolerate=tolerate, timeout=timeout) for site in sites if where is None or where(site)]
    return CrashExploration(op_name, tuple(sites), tuple(runs))


@contextlib.contextmanager
def _fresh_tmux() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="orch-tmux-"))
    try:
        with private_server(directory):
            yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _record_sites(directory: Path, op_name: str, setup: Setup, op: CrashOp, *, seed: int, writer: Writer | None,
                  timeout: float) -> tuple[list[CrashSite], Any]:
    from registry import store

    base = directory / "ws"
    base.mkdir(parents=True)
    log = directory / "sites.tsv"
    tape = Tape(directory / "tape", first_process=0, seed=seed)
    with _fresh_tmux():
        context = setup(tape.worker(ReferenceAdapter(base)))

        def child() -> None:
            if writer is not None:
                setattr(store.JsonFile, "write_bytes", writer)  # noqa: B010 - the child dies with it
            worker = tape.worker(ReferenceAdapter(base), 1)

            def hook(point: str, path: Path) -> None:
                with open(log, "a") as fh:
                    fh.write(f"{point}\t{file_label(path)}\n")

            store.set_crash_hook(hook)
            op(worker, context)

        exitcode = _reap(_fork(child), timeout)
        mine = [o for o in tape.ops() if o.process == 1 and not o.fault]
        if exitcode != 0 or not mine or any(o.outcome != "ok" for o in mine):
            detail = "; ".join(f"{o.name}: {o.outcome} {o.error or ''}" for o in mine) or "nothing was recorded"
            raise ChaosError(f"{op_name} did not succeed when nothing crashed (exit {exitcode}): {detail}")
        after = _Snapshot(base).shape()
    tape.close()
    lines = log.read_text().splitlines() if log.exists() else []
    sites = [CrashSite(i, *line.split("\t", 1)) for i, line in enumerate(lines)]
    if not sites:
        raise ChaosError(f"{op_name} passed no crash point: is the crash hook installed in the registry under test?")
    return sites, after


def _crash_run(directory: Path, op_name: str, setup: Setup, op: CrashOp, site: CrashSite, after_shape: Any, *,
               seed: int, writer: Writer | None, tolerate: Tolerate | None, timeout: float) -> CrashRun:
    from registry import store

    base = directory / "ws"
    base.mkdir(parents=True)
    tape = Tape(directory / "tape", first_process=0, seed=seed)
    problems: list[str] = []
    with _fresh_tmux():
        context = setup(tape.worker(ReferenceAdapter(base)))
        before = _Snapshot(base)
        before_shape = before.shape()
        before_findings = _health(base)

        def child() -> None:
            if writer is not None:
                setattr(store.JsonFile, "write_bytes", writer)  # noqa: B010 - the child dies with it
            worker = tape.worker(ReferenceAdapter(base), 1)
            passed = itertools.count()

            def hook(point: str, path: Path) -> None:
                if next(passed) == site.index:
                    worker.call("crash", lambda: None, fault=True, op=op_name, point=point, file=file_label(path),
                                at=site.index)
                    os._exit(CRASH_EXIT)

            store.set_crash_hook(hook)
            op(worker, context)

        crashed = _fork(child)
        exitcode = _reap(crashed, timeout)
        if exitcode != CRASH_EXIT:
            problems.append(f"the child was to crash at {site} but exited with status {exitcode}")
        try:
            reader: Any = ReferenceAdapter(base)  # a process started after the crash: it heals what it may
        except Exception as exc:
            problems.append(f"opening the registry after the crash failed: {type(exc).__name__}: {exc}")
            reader = ReferenceAdapter(base, heal=False)  # the files as they lie on disk
        after = _Snapshot(base)
        final = read_final(reader, [*after.tasks, *(t for t in after.errors if t != "global")])
        report = check_history(tape.history(), final, checks=CHECKS_WITHOUT_CONCURRENCY)
        problems += [f"[{p.check}] {p.message}" for p in report.problems]
        shape = after.shape()
        if after.errors:
            applied = "unreadable"
        elif shape == after_shape:
            applied = "fully"
        elif shape == before_shape:
            applied = "not at all"
        else:
            applied = "partly"
            problems.append(f"the {op_name} was applied partly: the registry matches neither the state before it"
                            " nor the state after it")
        if not after.errors:
            for finding in _health(base):
                if any(_same_finding(finding, old) for old in before_findings):
                    continue
                if tolerate is not None and tolerate(finding, context):
                    continue
                if finding.kind == "stale_temp" and f".{crashed.pid}." in Path(finding.path or "").name:
                    continue  # the crashed writer's own temp file: litter that `repair` removes, not damage
                problems.append(f"orch-registry check finds something new: {finding.kind}: {finding.message}")
    tape.close()
    return CrashRun(site, exitcode, applied, tuple(problems), report)


# --------------------------------------------------------------------------------------------------------------------
# A lock holder that stalls, and an adapter that will not wait long for a lock


class ImpatientReference(ReferenceAdapter):
    """The reference registry with a short lock timeout, so that a stalled holder makes it fail with LockTimeout."""

    def __init__(self, workspace: Path, lock_timeout: float = 0.2) -> None:
        super().__init__(workspace, lock_timeout=lock_timeout)


class StalledHolder:
    """A child process stopped inside the write protocol, holding the lock, until :meth:`finish` or :meth:`sigkill`.

    Its operation is recorded on the tape as process :attr:`process`; the stall is a fault that lasts until then.
    """

    def __init__(self, tape: Tape, process: int, child: Any, release: Any, stall_index: int, point: str,
                 file: str) -> None:
        self.tape = tape
        self.process = process
        self.point = point
        self.file = file
        self._child = child
        self._release = release
        self._stall_index = stall_index
        self.exitcode: int | None = None

    @property
    def pid(self) -> int:
        pid: int = self._child.pid
        return pid

    def _end_stall(self) -> None:
        if self._stall_index >= 0:
            self.tape.recorder(HARNESS).complete(self._stall_index, "ok")
            self._stall_index = -1

    def finish(self, timeout: float = 120.0) -> int | None:
        """Let the holder go on; wait for it to end; return its exit status (0: its operation returned)."""
        self._end_stall()
        self._release.set()
        self.exitcode = _reap(self._child, timeout)
        return self.exitcode

    def sigkill(self) -> int | None:
        """SIGKILL the holder where it stands (recorded as a fault); return its exit status (-9)."""
        self._end_stall()
        self.tape.fault("sigkill", process=self.process)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.exitcode = _reap(self._child, 30)
        return self.exitcode


# --------------------------------------------------------------------------------------------------------------------
# tmux


def _require_private_tmux() -> None:
    """Refuse to touch a tmux server that is not a test's private one."""
    if not os.environ.get("TMUX_TMPDIR") or os.environ.get("TMUX"):
        raise ChaosError("tmux faults run only on a private server: use the orch_workspace fixture or"
                         " pytest_orch.tmux.private_server (TMUX_TMPDIR set, TMUX unset)")


#: Fake ``tmux`` binaries: each fails the way a real one can, with a message that is not "no server running".
BROKEN_TMUX = {
    "version_mismatch": 'echo "protocol version mismatch (client 8, server 9)" >&2\nexit 1\n',
    "server_exited": 'echo "server exited unexpectedly" >&2\nexit 1\n',
    "killed": "kill -9 $$\n",
}


# --------------------------------------------------------------------------------------------------------------------
# The fixture object


class Chaos:
    """The ``orch_chaos`` fixture: faults for one test, all seeded from ``--orch-seed`` and the test's id.

    Every fault it injects is recorded on :attr:`tape`; :meth:`merge` lays them into a swarm's History and
    :meth:`check` checks what the tape alone recorded.  Faults that touch tmux refuse to run unless the test has a
    private server (the ``orch_workspace`` fixture).
    """

    def __init__(self, seed: str) -> None:
        self.seed = seed
        self.rng = random.Random(f"chaos:{seed}")
        self._made = 0
        self._tape: Tape | None = None

    # -- the record ------------------------------------------------------------------------------------------------

    @property
    def tape(self) -> Tape:
        if self._tape is None:
            directory = Path(tempfile.mkdtemp(prefix="orch-chaos-"))
            weakref.finalize(self, shutil.rmtree, directory, True)
            self._tape = Tape(directory, seed=_leading_int(self.seed))
        return self._tape

    def worker(self, adapter: Any) -> Worker:
        """A Worker in the test process whose calls through ``.registry`` (or ``.call``) go on the tape."""
        return self.tape.worker(adapter)

    def history(self) -> History:
        """What the tape recorded: the test process's calls, the children's, and every fault."""
        return self.tape.history()

    def merge(self, history: History) -> History:
        """*history* (a swarm's) with the tape's operations and faults laid in, in time order."""
        return self.tape.merge(history)

    def check(self, adapter: Any, *, tasks: list[str] | None = None, checks: Sequence[str] | None = None,
              raise_on_problems: bool = True) -> Report:
        """Check the tape's History against the documents *adapter* reads now; raise OrchViolation on a problem."""
        __tracebackhide__ = True
        history = self.history()
        final: Final = read_final(adapter, tasks or history.task_ids())
        report = check_history(history, final, checks=checks or CHECKS_WITHOUT_CONCURRENCY)
        if raise_on_problems and not report.ok:
            raise OrchViolation(report)
        return report

    def _rng(self, what: str) -> random.Random:
        self._made += 1
        return random.Random(f"chaos:{self.seed}:{what}:{self._made}")

    # -- SIGKILL ---------------------------------------------------------------------------------------------------

    def sigkills(self, kills: int = 3, *, stop: Path | None = None, first_after: float = 0.05, spread: float = 0.6,
                 keep_alive: int = 1) -> Callable[[SwarmHandle], None]:
        """A ``during`` callback for ``orch_swarm(..., during=...)`` that SIGKILLs up to *kills* random workers.

        With *stop*, that file is created after the last kill: a workload that runs until it exists is always
        working when the kills land.
        """
        self._made += 1
        return random_sigkills(f"{self.seed}:{self._made}", kills, first_after=first_after, spread=spread,
                               keep_alive=keep_alive, stop=stop)

    # -- crash points ----------------------------------------------------------------------------------------------

    def crash_points(self, root: Path, op_name: str, setup: Setup, op: CrashOp, *, writer: Writer | None = None,
                     tolerate: Tolerate | None = None,
                     where: Callable[[CrashSite], bool] | None = None) -> CrashExploration:
        """Crash *op* at every point of the reference write protocol it passes.  See :func:`explore_crash_points`."""
        return explore_crash_points(root, op_name, setup, op, seed=_leading_int(self.seed), writer=writer,
                                    tolerate=tolerate, where=where)

    # -- a lock holder that stalls ---------------------------------------------------------------------------------

    def stall(self, base: Path, op: Callable[[Worker], Any], *, at: str | None = None, file: str = "task registry",
              timeout: float = 60.0) -> StalledHolder:
        """Start a child that runs *op* on the reference registry at *base* and stops, holding the lock, at *at*.

        *at* is one of :data:`STALL_POINTS` (seeded choice when None), in the first *file* (``task registry`` or
        ``global registry``) the operation writes.  Returns once the child holds the lock there; ChaosError if it
        ended without reaching that point.
        """
        from registry import store

        point = at if at is not None else self._rng("stall").choice(STALL_POINTS)
        if point not in store.CRASH_POINTS:
            raise ChaosError(f"{point!r} is not a crash point; the points are {', '.join(store.CRASH_POINTS)}")
        tape = self.tape
        process = tape.new_process()
        ctx = multiprocess.get_context("fork")
        ready, release = ctx.Event(), ctx.Event()

        def child() -> None:
            worker = tape.worker(ReferenceAdapter(base), process)
            fired = False

            def hook(passed: str, path: Path) -> None:
                nonlocal fired
                if not fired and passed == point and file_label(path) == file:
                    fired = True
                    ready.set()
                    release.wait()

            store.set_crash_hook(hook)
            op(worker)

        proc = _fork(child)
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if not proc.is_alive() or time.monotonic() > deadline:
                release.set()
                code = _reap(proc, 10)
                raise ChaosError(f"the lock holder ended (exit {code}) without stalling at {point} of the {file}")
        index = tape.recorder(HARNESS).invoke("stall_lock", {"process": process, "point": point, "file": file},
                                              fault=True)
        return StalledHolder(tape, process, proc, release, index, point, file)

    # -- torn and corrupt files ------------------------------------------------------------------------------------

    def corrupt(self, path: Path, kind: str | None = None) -> bytes | None:
        """Break the registry file *path* the way *kind* says (:data:`CORRUPTIONS`; seeded choice when None).

        ``truncated`` cuts it at a seeded offset, ``invalid_utf8`` puts a byte that is never UTF-8 at a seeded
        offset, ``wrong_shape`` replaces it with valid JSON of the wrong shape, ``empty`` leaves zero bytes,
        ``missing`` deletes it.  Returns the bytes now in the file (None when missing).
        """
        rng = self._rng("corrupt")
        kind = kind if kind is not None else rng.choice(CORRUPTIONS)
        path = Path(path)
        data = path.read_bytes()
        new: bytes | None
        if kind == "truncated":
            cut = rng.randrange(1, len(data.rstrip()))
            new = data[:cut]
        elif kind == "invalid_utf8":
            at = rng.randrange(1, len(data) - 1)
            new = data[:at] + b"\xff" + data[at + 1:]
        elif kind == "wrong_shape":
            new = rng.choice([b"[]", b'"registry"', b"null", b'{"agents": {"not": "a list"}, "tasks": []}',
                              b'{"task_id": 7, "agents": 7}'])
        elif kind == "empty":
            new = b""
        elif kind == "missing":
            new = None
        else:
            raise ChaosError(f"unknown corruption {kind!r}: one of {', '.join(CORRUPTIONS)}")
        if new is None:
            path.unlink()
        else:
            path.write_bytes(new)
        self.tape.fault("corrupt", kind=kind, file=file_label(path), bytes=None if new is None else len(new))
        return new

    def drift_counters(self, path: Path) -> dict[str, tuple[int, int]]:
        """Rewrite the task registry *path* with its counters off by seeded amounts, as an unlocked writer leaves
        them: valid JSON of the right shape, replaced atomically, only the numbers wrong.  Returns key -> (old, new).
        """
        import json

        rng = self._rng("drift")
        doc = json.loads(path.read_bytes())
        keys = rng.sample(["total_spawned", "active_count", "completed_count"], rng.randint(1, 3))
        changes = {}
        for key in sorted(keys):
            old = int(doc.get(key, 0))
            new = old + rng.choice([-3, -2, -1, 1, 2, 3, 5])
            doc[key] = new
            changes[key] = (old, new)
        tmp = path.with_name(f".{path.name}.drift.tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(path)
        self.tape.fault("drift_counters", file=file_label(path),
                        **{key: f"{old} -> {new}" for key, (old, new) in changes.items()})
        return changes

    # -- a full disk -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def disk_full(self, *, at: str | None = None, file: str = "task registry", times: int = 1) -> Iterator[None]:
        """For the block, fail the next *times* temp writes of *file* with OSError(ENOSPC), in this process.

        *at* is ``before_temp_write`` (the temp file cannot be created) or ``after_temp_write`` (it was created
        and written, and the write ran out of space); seeded choice when None.  Injected through the crash hook
        of the reference registry: no real disk is filled.
        """
        from registry import store

        point = at if at is not None else self._rng("enospc").choice(["before_temp_write", "after_temp_write"])
        if point not in ("before_temp_write", "after_temp_write"):
            raise ChaosError(f"a full disk strikes at the temp write: before_temp_write or after_temp_write, not"
                             f" {point!r}")
        left = times

        def hook(passed: str, path: Path) -> None:
            nonlocal left
            if left > 0 and passed == point and file_label(path) == file:
                left -= 1
                self.tape.fault("enospc", point=point, file=file)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        old = store.set_crash_hook(hook)
        try:
            yield
        finally:
            store.set_crash_hook(old)

    # -- tmux ------------------------------------------------------------------------------------------------------

    def kill_sessions(self, sessions: Sequence[str], count: int) -> list[str]:
        """Kill *count* of *sessions* (a seeded choice) behind the registry's back; return the ones killed."""
        from registry import TmuxSessions

        _require_private_tmux()
        if count > len(sessions):
            raise ChaosError(f"cannot kill {count} of {len(sessions)} sessions")
        chosen = sorted(self._rng("zombies").sample(sorted(sessions), count))
        tmux = TmuxSessions()
        for session in chosen:
            self.tape.fault("tmux_kill", session=session)
            if not tmux.kill(session):
                raise ChaosError(f"session {session} was not running")
        return chosen

    def start_leaks(self, count: int, *, prefix: str = "leak") -> list[str]:
        """Start *count* ``agent_*`` sessions that no registry knows (seeded names); return their names."""
        from registry import TmuxSessions

        _require_private_tmux()
        rng = self._rng("leaks")
        tmux = TmuxSessions()
        names = [f"agent_{prefix}-{rng.getrandbits(32):08x}" for _ in range(count)]
        for name in names:
            self.tape.fault("tmux_leak", session=name)
            tmux.start(name, QUIET_AGENT_COMMAND)
        return names

    def kill_tmux_server(self) -> int:
        """SIGKILL the (private) tmux server process, taking every session with it; return its pid."""
        from registry import TmuxSessions

        _require_private_tmux()
        proc = TmuxSessions().server.cmd("display-message", "-p", "#{pid}")
        if proc.returncode != 0 or not proc.stdout or not proc.stdout[0].isdigit():
            raise ChaosError(f"could not find the tmux server's pid: {' '.join(proc.stderr) or proc.stdout}")
        pid = int(proc.stdout[0])
        doomed = sorted(TmuxSessions().alive())
        self.tape.fault("tmux_server_sigkill", pid=pid, sessions=len(doomed))
        for session in doomed:  # what the checks read: each session that went with the server is a tmux_kill
            self.tape.fault("tmux_kill", session=session, by=f"server sigkill (pid {pid})")
        os.kill(pid, signal.SIGKILL)
        for _ in range(400):  # its socket refuses connections once it is gone
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.005)
        return pid

    @contextlib.contextmanager
    def broken_tmux(self, kind: str | None = None) -> Iterator[str]:
        """For the block, put a ``tmux`` that fails (:data:`BROKEN_TMUX`; seeded choice when None) first on PATH.

        Every tmux call of this process and of the processes it starts then fails, as a real broken install or a
        server of another version would.  Yields the kind.
        """
        kind = kind if kind is not None else self._rng("tmux").choice(sorted(BROKEN_TMUX))
        if kind not in BROKEN_TMUX:
            raise ChaosError(f"unknown broken tmux {kind!r}: one of {', '.join(sorted(BROKEN_TMUX))}")
        directory = self.tape.directory / f"bin-{kind}-{secrets.token_hex(3)}"
        directory.mkdir()
        fake = directory / "tmux"
        fake.write_text("#!/bin/sh\n" + BROKEN_TMUX[kind])
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        saved = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{directory}{os.pathsep}{saved}"
        try:
            with self.tape.lasting_fault("broken_tmux", kind=kind):
                yield kind
        finally:
            os.environ["PATH"] = saved
