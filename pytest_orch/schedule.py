"""Controlled interleavings: every worker stops at each file-system event of the registry code it runs, and a seeded
scheduler in the test process decides which one goes on.  ``--orch-schedule=random|pct[:DEPTH]``.

How a worker is stopped.  ``sys.addaudithook`` (installed in the worker only, never in the test process) sees the
audit events CPython raises before it touches the file system: ``open`` (with its mode), ``os.rename`` (rename and
replace), ``os.remove``, ``os.listdir``/``os.scandir``, ``os.mkdir``, ``os.truncate``, ``fcntl.flock``/``lockf`` and
``subprocess.Popen`` (tmux).  Only events of a registry operation in flight count, and only those on paths under the
workspace (subprocesses always).  The beginning of every operation is an event too, so the scheduler also decides
when operations start.  One finer point needs more than the audit hook: a truncating open empties the file *before*
the data is written, and torn reads live in between.  So the worker's ``open``/``io.open``/``os.open`` are wrapped as
well, and a truncating open of a registry file raises a second event, ``write <path>``, after the file was emptied;
and ``fcntl.flock``/``lockf`` are wrapped so that releasing a lock is followed by an event, ``unlocked <path>`` (what
the holder does after its unlock, a late flush say, races with the next holder).

At an event the worker writes one line to its FIFO (``ev-N``) and blocks reading one byte from ``go-N``: ``g`` (go
on) or, at the beginning of an operation, ``s`` (skip it: a shrunk run leaves this operation out; the workload's
call returns None and nothing is recorded).
End of file on ``go-N`` (the scheduler is gone) turns the hook off: the worker runs free rather than hang.

The decision sequence depends only on the seed and the events, not on timing:

- the scheduler decides only when no granted worker is still running: the one it let go has reached its next event,
  exited, or been declared blocked; every other worker is stopped at an event, so the files are in a state the
  schedule alone determines;
- a worker whose next event is a lock request (``flock``/``lockf``) that would not be granted now is *held back*
  until it would be: the scheduler asks the kernel by trying the same lock, non-blocking, from the test process
  (possible because every holder is stopped).  So a blocking ``flock`` never blocks and a polling one never spins;
- only when a granted worker does not reach its next event within a grace period (1 s, 5 s after starting a
  subprocess; ``ORCH_SCHEDULE_GRACE``), while it is neither runnable nor waiting for a child it started, is it marked
  blocked, on something the hook does not see (a FIFO, a socket, a lock inside C): the timing fallback. It runs again
  whenever its next event arrives. The run counts these, and the report says that from there the order depended on
  timing. When every waiting worker is held back on a lock and nobody is blocked (a holder outside the swarm), the
  lowest-numbered is let go anyway (``forced``), so no schedule deadlocks the harness; a swarm's timeout still
  applies.

Schedulers: ``random`` picks uniformly among the workers that may go; ``pct`` is PCT (Burckhardt et al., ASPLOS
2010): random distinct priorities, ``DEPTH - 1`` change points drawn among the expected number of steps; the highest
priority worker runs, and at the i-th change point the running worker's priority drops to i.  It finds a bug of
depth d with probability at least 1/(n k^(d-1)).  Both are seeded from ``--orch-seed`` and the test: the same seed
replays the same events in the same order.

PCT with drawn parameters (:class:`Turn`, for the Hypothesis state machine's bursts): instead of a seed, each process
comes with its priority and the one event of its own after which its priority drops (0: none), and the first
``DEPTH - 1`` drops that happen are PCT's change points.  A change point named by the process and its own event
(rather than the global step) means the same thing whatever the other processes are: leave one out and the others
still interleave as before, so Hypothesis can shrink a failing burst to fewer operations, then drop the priority
changes it does not need (fewer context switches), while the same interleaving of the rest is kept.

Shrinking (:func:`shrink`): a failing schedule is replayed as a *guide*, the sequence of processes it chose (a
guided scheduler takes the next entry whose process may go, skipping the others, and once the guide is used up
keeps running the current worker: no further context switches).  First fewer operations (operations are skipped:
first all but the failing operation and one that overlapped it, pair by pair, then one at a time; the guide keeps the
steps of the operations that remain, so their interleaving is kept), then fewer context switches (whole segments of
the guide dropped, then its tail), each kept only while the same check still fails.  The report numbers the steps of
the shrunk failure, one line per event.
"""

# The worker's hook works on str paths with os.path: pathlib's calls would be more audited work inside the hook.
# ruff: noqa: PTH100, PTH109, PTH115, PTH118, PTH119

from __future__ import annotations

import builtins
import contextlib
import fcntl
import io
import itertools
import os
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

__all__ = ["Schedule", "ScheduleRun", "ScheduleSpec", "Step", "Turn", "child", "parse_schedule", "scheduled_op"]

#: Seconds a granted worker may take to reach its next event before it counts as blocked (the timing fallback).
GRACE = float(os.environ.get("ORCH_SCHEDULE_GRACE", "1.0") or 1.0)
#: ... after a subprocess was started (tmux), and after the swarm started (fork, adapter, barrier).
SLOW_GRACE = max(GRACE, 5.0)
#: Steps per operation PCT expects when it draws its change points (legacy's deploy takes about ten).
EVENTS_PER_OP = 12


# --------------------------------------------------------------------------------------------------------------------
# What to run


@dataclass(frozen=True)
class ScheduleSpec:
    kind: str  # "random", "pct" or "guided"
    depth: int = 3

    def __str__(self) -> str:
        return f"pct:{self.depth}" if self.kind == "pct" else self.kind

    @classmethod
    def parse(cls, text: str) -> ScheduleSpec:
        kind, _, depth = text.strip().partition(":")
        if kind == "random" and not depth:
            return cls("random")
        if kind == "pct":
            if not depth:
                return cls("pct", 3)
            try:
                d = int(depth)
            except ValueError:
                raise ValueError(f"{text!r}: DEPTH in pct:DEPTH must be a whole number") from None
            if d < 1:
                raise ValueError(f"{text!r}: DEPTH in pct:DEPTH must be at least 1")
            return cls("pct", d)
        raise ValueError(f"{text!r}: the schedules are 'random', 'pct' or 'pct:DEPTH'")


def parse_schedule(text: str) -> str:
    """The normalized ``--orch-schedule`` value; ValueError for anything else."""
    return str(ScheduleSpec.parse(text))


@dataclass(frozen=True)
class Step:
    """One decision of the scheduler: process *process*, in its operation *op*, was let go at *event*."""

    n: int
    process: int
    op: str
    event: str
    index: int = -1  # the operation's number among the operations its process's workload began

    def line(self) -> str:
        return f"{self.n:>4}. p{self.process} {self.op}: {self.event}"


@dataclass
class ScheduleRun:
    """The schedule a swarm (or burst) took: every step, the decisions, and how much of it depended on timing."""

    spec: str
    seed: str
    steps: list[Step] = field(default_factory=list)
    decisions: list[int] = field(default_factory=list)
    kills_at: list[int] = field(default_factory=list)
    skip: frozenset[tuple[int, int]] = frozenset()  # (process, operation number) left out of this run
    blocked: int = 0  # grants after which the worker did not reach an event within the grace period
    forced: int = 0  # workers let go although held back on a lock (nobody else could go)
    skipped: int = 0  # operations left out (a shrunk run)
    seconds: float = 0.0
    preempted_in_op: int = 0  # context switches away from a worker in the middle of an operation
    rerun: Any = None  # the context to run the swarm again (set by the plugin: see for_swarm)
    drawn: str = ""  # drawn parameters (Turn), shown instead of the seed

    @property
    def events(self) -> int:
        return len(self.steps)

    @property
    def switches(self) -> int:
        """Context switches: steps whose process is not the previous step's."""
        return sum(1 for a, b in itertools.pairwise(self.steps) if a.process != b.process)

    @property
    def operations(self) -> int:
        return sum(1 for s in self.steps if s.event.startswith("begin "))

    @property
    def deterministic(self) -> bool:
        return self.blocked == 0 and self.forced == 0

    def lines(self) -> list[str]:
        return [s.line() for s in self.steps]

    def signature(self) -> tuple[str, ...]:
        """The events in order, as the report prints them: equal for two runs that took the same schedule."""
        return tuple(self.lines())

    def summary(self) -> str:
        if not any(not s.event.startswith("begin ") for s in self.steps):
            return (f"schedule {self.spec} saw no file-system events: the registry's I/O is not visible to the audit"
                    " hook (SQLite inside C, a server over a socket), so the operations ran free-running"
                    f" ({self.operations} began in the scheduler's order)")
        timing = ""
        if not self.deterministic:
            timing = (f"; {self.blocked} time(s) a worker did not reach its next event within the grace period"
                      f" (blocked outside the locks the scheduler sees) and {self.forced} forced grant(s): from"
                      " there the order depended on timing, so a replay may differ")
        origin = f"drawn: {self.drawn}" if self.drawn else f"seed {self.seed}"
        return (f"schedule {self.spec} ({origin}): {self.events} events, {self.operations} operations,"
                f" {self.switches} context switches ({self.preempted_in_op} inside an operation) in"
                f" {self.seconds:.2f} s{timing}")

    def concurrency_problems(self) -> list[Any]:
        """What replaces the overlap check for a scheduled run: nothing.  How much the operations overlapped in time
        is the scheduler's decision, not a sign of a run too small to race (PCT runs a worker alone for long
        stretches on purpose); the note says how often it switched inside an operation."""
        return []


# --------------------------------------------------------------------------------------------------------------------
# The worker's side


class _Hooked:
    """The scheduled worker's state: its FIFOs, whether an operation is in flight, and the paths that count."""

    def __init__(self, process: int, ev_path: str, go_path: str, roots: Sequence[str]) -> None:
        self.process = process
        self.ev = os.open(ev_path, os.O_WRONLY | os.O_CLOEXEC)
        self.go = os.open(go_path, os.O_RDONLY | os.O_CLOEXEC)
        self.roots = tuple(roots)
        self.in_op = False
        self.busy = False
        self.live = True

    def send(self, msg: list[Any]) -> None:
        if self.live:
            try:
                os.write(self.ev, orjson.dumps(msg) + b"\n")
            except OSError:
                self.live = False

    def ask(self, msg: list[Any]) -> None:
        """Announce an event and wait until the scheduler lets this worker go on."""
        if not self.live:
            return
        self.send(msg)
        try:
            reply = os.read(self.go, 1)
        except OSError:
            reply = b""
        if reply == b"s":
            raise _Skip
        if reply != b"g":
            self.live = False  # the scheduler is gone: run free rather than hang

    def close(self) -> None:
        self.live = False
        for fd in (self.ev, self.go):
            with contextlib.suppress(OSError):
                os.close(fd)

    def rel(self, path: Any) -> str | None:
        """*path* relative to the workspace, or None when it is not under it (or is a descriptor)."""
        if isinstance(path, int) or path is None:
            return None
        try:
            text = os.fsdecode(os.fspath(path))
        except TypeError:
            return None
        text = os.path.abspath(text)
        for root in self.roots:
            if text == root:
                return "."
            if text.startswith(root + os.sep):
                return text[len(root) + 1:]
        return None


class _Skip(Exception):
    """The scheduler leaves this operation out (a shrunk run)."""


_W: _Hooked | None = None
_installed = False

_OPEN_MODES = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "r+"}


def _mode(mode: Any, flags: int) -> str:
    if isinstance(mode, str):
        return mode
    shown = _OPEN_MODES.get(flags & os.O_ACCMODE, "?")
    if flags & os.O_TRUNC:
        shown += " trunc"
    if flags & os.O_CREAT:
        shown += " creat"
    if flags & getattr(os, "O_DIRECTORY", 0):
        shown = "dir"
    return shown


def _fd_path(fd: Any) -> str | None:
    if not isinstance(fd, int):
        try:
            fd = fd.fileno()
        except Exception:
            return None
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


_LOCK_NAMES = ((fcntl.LOCK_UN, "UN"), (fcntl.LOCK_EX, "EX"), (fcntl.LOCK_SH, "SH"), (fcntl.LOCK_NB, "NB"))


def _lock_text(op: int) -> str:
    return "|".join(name for bit, name in _LOCK_NAMES if op & bit) or str(op)


def _subcommand(args: Any) -> str:
    argv = [str(a) for a in args] if isinstance(args, list | tuple) else [str(args)]
    words = [a for a in argv[1:] if re.fullmatch(r"[a-z]+(-[a-z]+)*", a)]
    return " ".join([os.path.basename(argv[0]) if argv else "?", *words[:1]])


def _event(w: _Hooked, event: str, args: tuple[Any, ...]) -> list[Any] | None:
    """The message for audit *event*, or None when it does not count."""
    if event == "open":
        rel = w.rel(args[0])
        return None if rel is None else ["e", f"open {rel} {_mode(args[1], args[2])}"]
    if event == "os.rename":
        a, b = w.rel(args[0]), w.rel(args[1])
        return None if a is None and b is None else ["e", f"replace {a or args[0]} -> {b or args[1]}"]
    if event in ("os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.listdir", "os.scandir"):
        target = args[0] if args else "."
        rel = w.rel(os.getcwd() if target is None else target)
        verb = {"os.remove": "remove", "os.rmdir": "rmdir", "os.mkdir": "mkdir", "os.truncate": "truncate",
                "os.listdir": "listdir", "os.scandir": "listdir"}[event]
        return None if rel is None else ["e", f"{verb} {rel}"]
    if event in ("fcntl.flock", "fcntl.lockf"):
        path = _fd_path(args[0])
        rel = w.rel(path)
        if rel is None or path is None:
            return None
        kind = event.partition(".")[2]
        op = int(args[1])
        return ["l", f"{kind} {rel} {_lock_text(op)}", path, op, kind]
    if event == "subprocess.Popen":
        return ["e", f"spawn {_subcommand(args[1])}", "slow"]
    return None


_WATCHED = frozenset({"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.listdir",
                      "os.scandir", "fcntl.flock", "fcntl.lockf", "subprocess.Popen"})


def _audit(event: str, args: tuple[Any, ...]) -> None:
    w = _W
    if w is None or not w.in_op or w.busy or event not in _WATCHED:
        return
    w.busy = True
    try:
        msg = _event(w, event, args)
        if msg is not None:
            w.ask(msg)
    finally:
        w.busy = False


def _after_truncating_open(path: Any, truncated: bool) -> None:
    w = _W
    if w is None or not w.in_op or w.busy or not truncated:
        return
    w.busy = True
    try:
        rel = w.rel(path)
        if rel is not None:
            w.ask(["e", f"write {rel}"])
    finally:
        w.busy = False


def _install() -> None:
    """Once per process: the audit hook, and ``open``/``io.open``/``os.open`` wrapped for the ``write`` event."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.addaudithook(_audit)
    real_open, real_os_open = builtins.open, os.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(file, mode, *args, **kwargs)
        if _W is not None and _W.in_op:
            _after_truncating_open(file, "w" in mode)
        return fh

    def os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = real_os_open(path, flags, mode, dir_fd=dir_fd)
        if _W is not None and _W.in_op and dir_fd is None:
            _after_truncating_open(path, bool(flags & os.O_TRUNC) and flags & os.O_ACCMODE != os.O_RDONLY)
        return fd

    builtins.open = open_
    io.open = open_
    os.open = os_open
    for name in ("flock", "lockf"):
        setattr(fcntl, name, _unlocking(getattr(fcntl, name), name))
    real_close = os.close

    def close(fd: int) -> None:
        w = _W
        path = _LOCKED.pop(fd, None) if w is not None and w.in_op else None
        real_close(fd)
        if path is not None:
            _after_unlock(path)

    os.close = close


#: Descriptors this worker holds a lock on (taken in an operation): closing one releases the lock.
_LOCKED: dict[int, str] = {}


def _after_unlock(path: str | None) -> None:
    w = _W
    if w is None or not w.in_op or w.busy:
        return
    w.busy = True
    try:
        rel = w.rel(path)
        if rel is not None:
            w.ask(["e", f"unlocked {rel}"])
    finally:
        w.busy = False


def _unlocking(real: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """``fcntl.flock``/``lockf`` with an event right after a lock is released (``unlocked <path>``): the moment
    another worker may take it, and what the holder does next (a late flush) races with it."""

    def call(fd: Any, operation: int, *args: Any) -> Any:
        result = real(fd, operation, *args)
        if _W is not None and _W.in_op and isinstance(fd, int):
            if operation & fcntl.LOCK_UN:
                _LOCKED.pop(fd, None)
                _after_unlock(_fd_path(fd))
            else:
                _LOCKED[fd] = _fd_path(fd) or ""
        return result

    return call


def _hook_worker(process: int, fifo_dir: str, roots: Sequence[str]) -> _Hooked:
    global _W
    _install()
    if _W is not None:
        _W.close()
    _W = _Hooked(process, os.path.join(fifo_dir, f"ev-{process}"), os.path.join(fifo_dir, f"go-{process}"), roots)
    return _W


def _roots(workspace: Path) -> tuple[str, ...]:
    return tuple(dict.fromkeys([os.path.abspath(workspace), os.path.realpath(workspace)]))


#: Set in the test process just before a scheduled swarm forks its workers (they inherit it), else None.
_PREPARED: Schedule | None = None


def child(worker: Any) -> None:
    """In a swarm worker (after the fork): hook it to the scheduler of its swarm, if the swarm is scheduled.

    The recorder's invoke and complete are wrapped so that each operation begins with an event and only the events
    of an operation in flight count.  A no-op (one test) for a free-running swarm.
    """
    schedule = _PREPARED
    if schedule is None:
        return
    schedule.close_controller_side()  # inherited: the worker must not hold the scheduler's ends
    w = _hook_worker(worker.process, schedule.fifo_dir, _roots(worker.workspace))
    call = worker.call

    def scheduled_call(name: str, fn: Callable[[], Any], *, fault: bool = False, **args: Any) -> Any:
        try:
            w.ask(["b", name, _describe_args(name, args)])
        except _Skip:
            worker.last = None
            return None
        w.in_op = True
        try:
            return call(name, fn, fault=fault, **args)
        finally:
            w.in_op = False
            w.send(["d"])

    worker.call = scheduled_call


def _describe_args(name: str, args: Mapping[str, Any]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in args.items() if k != "task_id")
    return f"{name}({shown})"[:80]


@contextlib.contextmanager
def scheduled_op(fifo_dir: str | None, index: int, workspace: str, name: str, desc: str) -> Iterator[None]:
    """In a burst worker: run one operation under the scheduler at *fifo_dir* (a no-op when it is None).

    The worker is persistent (:mod:`pytest_orch.burst`), so it is left as it was found: the FIFOs closed, no
    scheduler attached (the audit hook and the wrapped calls stay, and do nothing without one) and no locked
    descriptor remembered, so a later burst sees no ``unlocked`` event of this one."""
    if fifo_dir is None:
        yield
        return
    global _W
    w = _hook_worker(index, fifo_dir, _roots(Path(workspace)))
    try:
        w.ask(["b", name, desc])
        w.in_op = True
        try:
            yield
        finally:
            w.in_op = False
            w.send(["f"])
    finally:
        w.close()
        _W = None
        _LOCKED.clear()


# --------------------------------------------------------------------------------------------------------------------
# The scheduler's side

_RUN, _PEND, _BLOCK, _DONE = "running", "pending", "blocked", "done"


class _Policy:
    def choose(self, enabled: list[int], step: int, current: int | None) -> int:
        raise NotImplementedError


class _Random(_Policy):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, enabled: list[int], step: int, current: int | None) -> int:
        return self.rng.choice(enabled)


class _PCT(_Policy):
    """Burckhardt et al.: priorities depth..depth+n-1 at random, depth-1 change points among k expected steps."""

    def __init__(self, rng: random.Random, n: int, depth: int, k: int) -> None:
        self.prio = dict(enumerate(rng.sample(range(depth, depth + n), n)))
        points = rng.sample(range(1, max(k, depth) + 1), depth - 1)
        self.change = {step: i + 1 for i, step in enumerate(sorted(points))}  # the i-th change point -> priority i

    def choose(self, enabled: list[int], step: int, current: int | None) -> int:
        chosen = max(enabled, key=lambda p: self.prio.get(p, 0))
        if step in self.change:
            self.prio[chosen] = self.change[step]
        return chosen


@dataclass(frozen=True)
class Turn:
    """A process's part of a PCT schedule drawn by Hypothesis: its *priority* (higher runs first; ties go to the
    lower-numbered process) and *change_after*, the number of its own steps after which its priority drops below
    every other (0: never), if fewer than ``DEPTH - 1`` drops happened before."""

    priority: int = 0
    change_after: int = 0

    def __str__(self) -> str:
        return f"priority {self.priority}" + (f", drops after its step {self.change_after}" if self.change_after
                                               else "")


class _Turns(_Policy):
    """PCT with :class:`Turn` parameters: at most depth-1 drops, the i-th to priority i (below every initial one)."""

    def __init__(self, turns: Sequence[Turn], depth: int) -> None:
        self.turns = list(turns)
        self.prio = {p: depth + t.priority for p, t in enumerate(turns)}
        self.changes_left = depth - 1
        self.drops = 0
        self.steps = dict.fromkeys(range(len(turns)), 0)

    def choose(self, enabled: list[int], step: int, current: int | None) -> int:
        chosen = max(enabled, key=lambda p: (self.prio.get(p, 0), -p))
        self.steps[chosen] = self.steps.get(chosen, 0) + 1
        turn = self.turns[chosen] if chosen < len(self.turns) else Turn()
        if turn.change_after and self.steps[chosen] == turn.change_after and self.drops < self.changes_left:
            self.drops += 1
            self.prio[chosen] = self.drops
        return chosen


class _Guided(_Policy):
    """Replays a guide: the next entry whose process may go (others are skipped); then no more context switches."""

    def __init__(self, guide: Sequence[int]) -> None:
        self.guide = deque(guide)

    def choose(self, enabled: list[int], step: int, current: int | None) -> int:
        while self.guide:
            p = self.guide.popleft()
            if p in enabled:
                return p
        return current if current in enabled else min(enabled)


class Schedule:
    """The scheduler of one swarm or burst.  ``run_swarm(..., schedule=Schedule("pct:3", seed))``.

    *skip* leaves out operations, each ``(process, n)``: the n-th (from 0) its workload begins;
    *guide* makes it a guided replay (see the module docstring); *kills* SIGKILLs up to that many workers at seeded
    steps (with ``--orch-chaos=sigkill``), each a step of the schedule.
    """

    def __init__(self, spec: ScheduleSpec | str, seed: str, *, kills: int = 0,
                 skip: frozenset[tuple[int, int]] = frozenset(),
                 guide: Sequence[int] | None = None, kills_at: Sequence[int] | None = None,
                 expected_steps: int | None = None, turns: Sequence[Turn] | None = None) -> None:
        if guide is not None:
            spec = ScheduleSpec("guided")
        self.spec = spec if isinstance(spec, ScheduleSpec) else ScheduleSpec.parse(spec)
        if turns is not None and self.spec.kind != "pct":
            raise ValueError(f"drawn turns are parameters of PCT, not of {self.spec}")
        self.turns = list(turns) if turns is not None else None
        self.seed = seed
        self.kills = kills
        self.skip = skip
        self.guide = list(guide) if guide is not None else None
        self.kills_at = list(kills_at) if kills_at is not None else None
        self.expected_steps = expected_steps
        self.fifo_dir = ""
        self.n = 0
        self.pids: list[int | None] = []
        self._ev: list[int] = []
        self._go: list[int] = []
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.run = ScheduleRun(str(self.spec), seed, skip=skip,
                               drawn="; ".join(f"p{p} {t}" for p, t in enumerate(self.turns or ())))
        self._names: dict[str, str] = {}

    # The transport ---------------------------------------------------------------------------------------------

    def open(self, n: int) -> str:
        """Make the FIFOs of *n* workers and open the scheduler's ends; return their directory."""
        self.n = n
        self.fifo_dir = tempfile.mkdtemp(prefix="orch-sched-")
        for i in range(n):
            ev, go = os.path.join(self.fifo_dir, f"ev-{i}"), os.path.join(self.fifo_dir, f"go-{i}")
            os.mkfifo(ev, 0o600)
            os.mkfifo(go, 0o600)
            # O_RDWR: opening never blocks, and the worker's opens find the other end there.
            self._ev.append(os.open(ev, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
            self._go.append(os.open(go, os.O_RDWR | os.O_CLOEXEC))
        self._wake_r, self._wake_w = os.pipe()
        return self.fifo_dir

    def close_controller_side(self) -> None:
        for fd in [*self._ev, *self._go, self._wake_r, self._wake_w]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ev, self._go = [], []
        self._wake_r = self._wake_w = -1

    def close(self) -> None:
        global _PREPARED
        if _PREPARED is self:
            _PREPARED = None
        self.close_controller_side()
        if self.fifo_dir:
            shutil.rmtree(self.fifo_dir, ignore_errors=True)

    # The swarm's protocol (run_swarm) ------------------------------------------------------------------------------

    def fork(self, concurrency: int, ops: int) -> None:
        """Before the workers fork: make the FIFOs, and let the workers find this schedule (see :func:`child`)."""
        global _PREPARED
        self.open(concurrency)
        if self.expected_steps is None:
            self.expected_steps = concurrency * ops * EVENTS_PER_OP
        _PREPARED = self

    def start(self, handle: Any) -> None:
        """After the barrier: run the scheduler in a thread of the test process."""
        global _PREPARED
        _PREPARED = None
        self.pids = [p.pid for p in handle.processes]
        self.start_thread([p.sentinel for p in handle.processes], handle.sigkill)

    def start_thread(self, sentinels: Sequence[int | None], kill: Callable[[int], None] | None,
                     expected: int | None = None) -> None:
        if self.expected_steps is None:
            self.expected_steps = expected or self.n * 8 * EVENTS_PER_OP
        self._thread = threading.Thread(target=self._main, args=(list(sentinels), kill), name="orch-schedule",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> ScheduleRun:
        """End the scheduler (the workers are done, or were killed) and return the schedule it took."""
        global _PREPARED
        _PREPARED = None
        self._stop.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"!")
        if self._thread is not None:
            self._thread.join(30)
        if self._error is not None:
            raise RuntimeError(f"the scheduler failed: {self._error!r}") from self._error
        return self.run

    # The loop ----------------------------------------------------------------------------------------------------

    def _policy(self, rng: random.Random) -> _Policy:
        if self.guide is not None:
            return _Guided(self.guide)
        if self.turns is not None:
            return _Turns(self.turns, self.spec.depth)
        if self.spec.kind == "pct":
            return _PCT(rng, self.n, self.spec.depth, self.expected_steps or 1)
        return _Random(rng)

    def _main(self, sentinels: list[int | None], kill: Callable[[int], None] | None) -> None:
        try:
            self._loop(sentinels, kill)
        except BaseException as exc:  # pragma: no cover - a bug of the scheduler: let the workers run free
            self._error = exc
        finally:
            for fd in self._go:  # end of file for any worker still waiting: it runs free
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._go = []

    def _loop(self, sentinels: list[int | None], kill: Callable[[int], None] | None) -> None:
        n, run = self.n, self.run
        started = time.monotonic()
        rng = random.Random(f"schedule:{self.spec}:{self.seed}")
        policy = self._policy(rng)
        k = self.expected_steps or 1
        if self.kills_at is not None:
            kill_steps = set(self.kills_at)
        else:
            kill_steps = set(rng.sample(range(2, k + 2), min(self.kills, k))) if self.kills and kill else set()
        state = [_RUN] * n
        deadline = [started + SLOW_GRACE] * n
        pending: list[list[Any] | None] = [None] * n
        op = ["-"] * n
        in_op = [False] * n
        begun = [0] * n
        buf = [b""] * n
        current: int | None = None
        poller = select.poll()
        fd_of: dict[int, tuple[str, int]] = {}
        for i in range(n):
            poller.register(self._ev[i], select.POLLIN)
            fd_of[self._ev[i]] = ("ev", i)
            s = sentinels[i] if i < len(sentinels) else None
            if s is not None:
                poller.register(s, select.POLLIN)
                fd_of[s] = ("exit", i)
        poller.register(self._wake_r, select.POLLIN)

        def done(i: int) -> None:
            if state[i] != _DONE:
                state[i] = _DONE
                pending[i] = None
                with contextlib.suppress(KeyError, ValueError):
                    poller.unregister(self._ev[i])
                s = sentinels[i] if i < len(sentinels) else None
                if s is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        poller.unregister(s)

        def message(i: int, msg: list[Any]) -> None:
            kind = msg[0]
            if kind == "d":
                in_op[i] = False
                return
            if kind == "f":
                in_op[i] = False
                done(i)
                return
            if kind == "b":
                begun[i] += 1
                if (i, begun[i] - 1) in self.skip:
                    run.skipped += 1
                    os.write(self._go[i], b"s")
                    state[i], deadline[i] = _RUN, time.monotonic() + GRACE
                    return
            state[i], pending[i] = _PEND, msg

        def pump(timeout: float | None) -> bool:
            """Wait up to *timeout* for messages and exits; True if something arrived."""
            ms = None if timeout is None else max(0, int(timeout * 1000) + 1)
            got = False
            for fd, _ in poller.poll(ms):
                what, i = fd_of.get(fd, ("wake", -1))
                if what == "wake":
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 64)
                    continue
                got = True
                if what == "exit":
                    self._drain(i, buf, message)
                    done(i)
                    continue
                self._drain(i, buf, message)
            return got

        while not self._stop.is_set():
            # Settle: wait until the granted worker has reached its next event (or exited, or is blocked).
            while not self._stop.is_set():
                running = [i for i in range(n) if state[i] == _RUN]
                if not running:
                    break
                now = time.monotonic()
                for i in running:
                    if deadline[i] <= now:
                        if _working(self.pids[i] if i < len(self.pids) else None):
                            deadline[i] = now + GRACE  # slow (a loaded machine), not blocked
                            continue
                        state[i] = _BLOCK
                        run.blocked += 1
                running = [i for i in running if state[i] == _RUN]
                if running:
                    pump(min(deadline[i] for i in running) - now)
            if self._stop.is_set():
                break
            live = [i for i in range(n) if state[i] != _DONE]
            if not live:
                break
            waiting = [i for i in range(n) if state[i] == _PEND]
            if not waiting:
                pump(1.0)  # every live worker is blocked outside what the hook sees: wait for one to come back
                continue
            enabled = [i for i in waiting if self._may_go(pending[i])]
            if not enabled:
                if any(state[i] == _BLOCK for i in range(n)) and pump(GRACE):
                    continue
                enabled = [min(waiting)]  # a holder outside the swarm, or a lock asked for twice: never deadlock
                run.forced += 1
            step = len(run.steps) + 1
            chosen = policy.choose(enabled, step, current)
            msg = pending[chosen]
            assert msg is not None
            if msg[0] == "b":
                op[chosen] = str(msg[1])
                in_op[chosen] = True
                event = "begin " + str(msg[2])
            else:
                event = self._name(str(msg[1]))
            if current is not None and chosen != current and in_op[current] and state[current] != _DONE:
                run.preempted_in_op += 1
            if step in kill_steps and kill is not None and len(live) > 1:
                run.steps.append(Step(step, chosen, op[chosen], f"SIGKILL (at {event})", begun[chosen] - 1))
                run.decisions.append(chosen)
                run.kills_at.append(step)
                kill(chosen)
                state[chosen], deadline[chosen], pending[chosen] = _RUN, time.monotonic() + SLOW_GRACE, None
                current = chosen
                continue
            run.steps.append(Step(step, chosen, op[chosen], event, begun[chosen] - 1))
            run.decisions.append(chosen)
            current = chosen
            pending[chosen] = None
            state[chosen] = _RUN
            deadline[chosen] = time.monotonic() + (SLOW_GRACE if len(msg) > 2 and msg[-1] == "slow" else GRACE)
            try:
                os.write(self._go[chosen], b"g")
            except OSError:
                done(chosen)
        run.seconds = time.monotonic() - started

    def _drain(self, i: int, buf: list[bytes], message: Callable[[int, list[Any]], None]) -> None:
        while True:
            try:
                data = os.read(self._ev[i], 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            buf[i] += data
        *lines, buf[i] = buf[i].split(b"\n")
        for line in lines:
            if line:
                message(i, orjson.loads(line))

    def _name(self, text: str) -> str:
        """Task ids become t0, t1... in order of appearance; other long hex or digit runs (ids, times) become *."""
        names = self._names

        def task(m: re.Match[str]) -> str:
            return names.setdefault(m.group(0), f"t{len(names)}")

        text = re.sub(r"(?i)\btask-[0-9a-z]+(?:-[0-9a-z]+)*", task, text)
        return re.sub(r"[0-9a-f]{6,}", "*", text)

    @staticmethod
    def _may_go(msg: list[Any] | None) -> bool:
        """False for a lock request that would not be granted now: ask the kernel with the same lock, non-blocking."""
        if msg is None or msg[0] != "l":
            return True
        _, _, path, op, kind = msg
        if op & fcntl.LOCK_UN:
            return True
        want = fcntl.LOCK_EX if op & fcntl.LOCK_EX else fcntl.LOCK_SH
        try:
            fd = os.open(path, (os.O_RDWR if kind == "lockf" and want == fcntl.LOCK_EX else os.O_RDONLY)
                         | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return True
        try:
            if kind == "lockf":
                fcntl.lockf(fd, want | fcntl.LOCK_NB)
                fcntl.lockf(fd, fcntl.LOCK_UN)
            else:
                fcntl.flock(fd, want | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------------------------
# In the plugin: run a swarm again from the same start, explore more schedules, shrink a failing one

#: Schedules a scheduled swarm's check tries (each from the same start) before it counts as passing.
TRIES = int(os.environ.get("ORCH_SCHEDULE_TRIES", "10") or 10)
#: Runs, and seconds, the shrinker may spend.
SHRINK_RUNS = int(os.environ.get("ORCH_SCHEDULE_SHRINK_RUNS", "80") or 80)
SHRINK_SECONDS = float(os.environ.get("ORCH_SCHEDULE_SHRINK_SECONDS", "180") or 180)
#: The checks a shrink keeps failing, in order of preference (else the first problem's).
PREFERRED = ("lost_insert", "lost_update", "duplicate", "limits", "torn_read", "crash")


#: Problems that are findings about the registry (worth shrinking), unlike ``inconclusive``.
_BUGS = frozenset({"lost_insert", "lost_update", "count_drift", "duplicate", "limits", "corruption", "invariants",
                   "global_agreement", "torn_read", "crash", "session_leak"})


@dataclass
class Rerun:
    """What it takes to run a scheduled swarm again from the same start."""

    impl: str
    workspace: Path
    workload: Any
    tasks: list[str] | None
    concurrency: int
    ops: int
    seed: int
    label: str
    timeout: float
    shared: dict[str, Any] | None
    initial: dict[str, dict[str, Any]]
    snapshot: Path
    sessions_before: frozenset[str]
    spec: str
    schedule_seed: str
    kills: int
    replay: str


def for_swarm(swarm: Any, workload: Any, *, tasks: list[str] | None, concurrency: int, ops: int,
              shared: dict[str, Any] | None, initial: dict[str, dict[str, Any]]) -> Schedule:
    """The schedule of the plugin's next swarm (``orch_swarm``), with what it takes to run it again."""
    from .chaos import parse_chaos

    o = swarm.options
    seed = f"{o.seed}:{swarm.request.node.nodeid}:{len(swarm.histories)}"
    kills = parse_chaos(o.chaos).sigkills if o.chaos else 0
    snapshot = Path(tempfile.mkdtemp(prefix="orch-sched-start-")) / "ws"
    shutil.copytree(swarm.workspace, snapshot, symlinks=True)
    swarm.request.addfinalizer(lambda: shutil.rmtree(snapshot.parent, ignore_errors=True))
    schedule = Schedule(o.schedule, f"{seed}:0", kills=kills)
    schedule.run.rerun = Rerun(o.impl, swarm.workspace, workload, tasks, concurrency, ops, o.seed,
                               swarm.request.node.nodeid, o.timeout, shared, initial, snapshot,
                               swarm.sessions_before, o.schedule, seed, kills, swarm.replay())
    return schedule


def _restore(rr: Rerun) -> None:
    """The workspace and the tmux sessions as they were before the first run."""
    from .tmux import QUIET_AGENT_COMMAND, live_sessions

    alive = set(live_sessions())
    for name in alive - rr.sessions_before:
        subprocess.run(["tmux", "kill-session", "-t", f"={name}"], capture_output=True, check=False)
    for name in sorted(rr.sessions_before - alive):  # killed by the run (a lost session): back as it was
        subprocess.run(["tmux", "new-session", "-d", "-s", name, QUIET_AGENT_COMMAND], capture_output=True,
                       check=False)
    for entry in list(rr.workspace.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    shutil.copytree(rr.snapshot, rr.workspace, symlinks=True, dirs_exist_ok=True)


def run_again(rr: Rerun, schedule: Schedule, **check: Any) -> Any:
    """Run the swarm of *rr* from its start under *schedule*; return the check's Report (its history included)."""
    from .adapter import load_factory
    from .checks import check_history, read_final
    from .swarm import run_swarm
    from .tmux import live_sessions

    _restore(rr)
    history = run_swarm(rr.impl, rr.workspace, rr.workload, concurrency=rr.concurrency, ops=rr.ops, seed=rr.seed,
                        timeout=rr.timeout, label=rr.label, shared=rr.shared, initial=rr.initial, schedule=schedule)
    final = read_final(load_factory(rr.impl)(rr.workspace), rr.tasks or history.task_ids(), sessions=live_sessions(),
                       sessions_before=rr.sessions_before, clock=(time.time(), time.monotonic_ns()))
    return check_history(history, final, replay=rr.replay, **check)


def target_check(report: Any) -> str:
    found: list[str] = [p.check for p in report.problems if p.check != "inconclusive"] or ["inconclusive"]
    return next((c for c in PREFERRED if c in found), found[0])


@dataclass
class Shrunk:
    report: Any  # the Report of the shrunk failure
    run: ScheduleRun
    runs: int  # swarms the shrinker ran
    check: str


def shrink(rr: Rerun, report: Any, *, check: str | None = None, max_runs: int = SHRINK_RUNS,
           max_seconds: float = SHRINK_SECONDS, **check_args: Any) -> Shrunk:
    """Shrink the failing scheduled run of *report*: fewer operations, then fewer context switches, while *check*
    (by default the preferred of its problems) still fails.  Every candidate is a guided replay from the same start,
    so the result depends only on the failing schedule (timing aside, see the module docstring)."""
    check = check or target_check(report)
    run: ScheduleRun = report.history.schedule
    best_report, best = report, run
    universe = frozenset((s.process, s.index) for s in run.steps if s.event.startswith("begin "))
    keep = set(universe)
    guide = list(run.decisions)
    kills_at = list(run.kills_at)
    runs = 0
    deadline = time.monotonic() + max_seconds

    def attempt(k: set[tuple[int, int]], g: list[int], fewer_switches: bool = False) -> bool:
        nonlocal runs, best_report, best, keep, guide
        if runs >= max_runs or time.monotonic() > deadline or not k:
            return False
        runs += 1
        schedule = Schedule("guided", run.seed, skip=universe - k, guide=g, kills_at=kills_at)
        candidate = run_again(rr, schedule, **check_args)
        if os.environ.get("ORCH_SCHEDULE_DEBUG"):
            print(f"shrink run {runs}: keep {sorted(k)}, guide {len(g)} -> {[p.check for p in candidate.problems]}"
                  f" {candidate.history.schedule.switches} switches", file=sys.stderr)
        taken: ScheduleRun = candidate.history.schedule
        if any(p.check == check for p in candidate.problems) and (
                not fewer_switches or taken.switches < best.switches):
            best_report, best = candidate, taken
            keep, guide = set(k), list(best.decisions)
            return True
        return False

    def guide_for(k: set[tuple[int, int]]) -> list[int]:
        return [s.process for s in best.steps if (s.process, s.index) in k]

    # 1. Fewer operations: the failing operation and one that overlapped it, pair by pair; then one at a time.
    pairs: list[set[tuple[int, int]]] = []
    for problem in [p for p in report.problems if p.check == check][:4]:
        mine = {(op.process, op.index) for op in problem.ops if op.process >= 0}
        for other in [*problem.context, *[op for op in report.history.calls if op not in problem.ops]]:
            pair = mine | {(other.process, other.index)}
            if len(pair) > len(mine) and pair <= universe and pair not in pairs and other.process not in {
                    p for p, _ in mine}:
                pairs.append(pair)
    for pair in pairs[:12]:
        if len(pair) < len(keep) and attempt(pair, guide_for(pair)):
            break
    changed = True
    while changed:
        changed = False
        for op in sorted(keep, reverse=True):
            smaller = keep - {op}
            if attempt(smaller, guide_for(smaller)):
                changed = True
                break
    # 2. Fewer context switches: drop whole segments of the guide, then cut its tail.
    changed = True
    while changed and best.switches > 1:
        changed = False
        segments = _segments(guide)
        for j in reversed(range(1, len(segments))):
            a, b = segments[j]
            if attempt(keep, guide[:a] + guide[b:], fewer_switches=True):
                changed = True
                break
    for a, _ in _segments(guide)[1:]:
        if best.switches <= 1:
            break
        if attempt(keep, guide[:a], fewer_switches=True):
            break
    return Shrunk(best_report, best, runs, check)


def _segments(guide: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i, p in enumerate(guide):
        if out and guide[out[-1][0]] == p:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _working(pid: int | None) -> bool:
    """Whether worker *pid* is still working rather than waiting: runnable, or waiting for a child it started (tmux).
    Asked only when the grace period is over, so a loaded machine does not make a slow worker look blocked."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        if state == b"R":
            return True
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as fh:
            return bool(fh.read().strip())
    except (OSError, IndexError):
        return False


def _switches(guide: Sequence[int]) -> int:
    return sum(1 for a, b in itertools.pairwise(guide) if a != b)


def explain(swarm: Any, report: Any, **check_args: Any) -> Any:
    """For ``orch_swarm.check``: a passing scheduled run tries more schedules (``ORCH_SCHEDULE_TRIES``) from the
    same start; a failing one is shrunk.  Returns the report with the schedule (and the shrunk steps) as notes."""
    run: ScheduleRun | None = report.history.schedule
    if run is None or run.rerun is None:
        return report
    rr: Rerun = run.rerun
    tried = 1
    if report.ok and run.steps:
        while report.ok and tried < TRIES:
            report = run_again(rr, Schedule(rr.spec, f"{rr.schedule_seed}:{tried}", kills=rr.kills), **check_args)
            tried += 1
        run = report.history.schedule
    head = f"{run.summary()}; {tried} schedule(s) tried"
    if report.ok or not run.steps or not any(p.check in PREFERRED or p.check in _BUGS for p in report.problems):
        return replace(report, notes=(*report.notes, head))
    shrunk = shrink(rr, report, **check_args)
    return replace(report, notes=(*report.notes, head + "\n" + render_shrunk(shrunk)))


def render_shrunk(shrunk: Shrunk) -> str:
    run = shrunk.run
    per = {p: n for p, n in sorted(_ops_per_process(run).items()) if n}
    first = next(p for p in shrunk.report.problems if p.check == shrunk.check)
    lines = [f"the failure, shrunk in {shrunk.runs} runs to {run.operations} operation(s)"
             f" ({', '.join(f'p{p}: {n}' for p, n in per.items())}) and {run.switches} context switch(es),"
             f" {shrunk.check} still failing:"]
    lines += run.lines()
    lines.append(f"  -> [{first.check}] {first.message.splitlines()[0]}")
    if not run.deterministic:
        lines.append(f"  ({run.summary().partition('; ')[2]})")
    return "\n".join(lines)


def _ops_per_process(run: ScheduleRun) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in run.steps:
        if s.event.startswith("begin "):
            out[s.process] = out.get(s.process, 0) + 1
    return out
