"""What each operation did and when: recorded by the workers, merged into a :class:`History` by the test process.

Each worker appends two lines per operation to its own file: one when it invokes the operation, one when it
completes.  A worker killed in between leaves the first line alone, and its operation becomes ``info``: it may or
may not have happened.  Times are ``time.monotonic_ns()``, one clock for every process on the machine.
"""

from __future__ import annotations

import os
import sysconfig
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from .adapter import Rejected

Outcome = Literal["ok", "fail", "info"]

#: The process number of operations made by the harness itself (faults injected from the test process).
HARNESS = -1


@dataclass(frozen=True, eq=False)
class Op:
    """One operation.  ``complete_ns`` is None when its worker died before it returned."""

    process: int
    index: int
    name: str
    args: dict[str, Any]
    invoke_ns: int
    complete_ns: int | None
    outcome: Outcome
    result: Any = None
    error: str | None = None
    fault: bool = False  # injected behind the registry's back (a tmux kill, a SIGKILL), not a registry call
    error_type: str | None = None  # the exception class of an ``info`` outcome that raised
    where: str | None = None  # the registry's source line it was raised from (``path:line``)
    expected: bool = False  # an exception the adapter declares in ``expected_errors``

    @property
    def crashed(self) -> bool:
        """The registry raised an exception it does not declare (not Rejected, not cut short by a fault)."""
        return self.outcome == "info" and self.error_type is not None and not self.expected

    @property
    def agent_id(self) -> str | None:
        """The agent this operation is about: its argument, or for a deploy the id it returned."""
        agent = self.args.get("agent_id")
        if agent is None and self.name == "deploy" and self.outcome == "ok":
            agent = self.result
        return agent if isinstance(agent, str) else None

    @property
    def task_id(self) -> str | None:
        task = self.args.get("task_id")
        if task is None and self.name == "create_task" and self.outcome == "ok":
            task = self.result
        return task if isinstance(task, str) else None

    def describe(self) -> str:
        """``deploy(type=alpha, parent=orchestrator)``: the operation and its interesting arguments."""
        shown = {k: v for k, v in self.args.items() if k not in ("task_id",)}
        return f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"


@dataclass(frozen=True)
class Raised:
    """What an exception raised by an adapter call says about the operation (its outcome is ``info``)."""

    error: str  # ``Type: message``
    error_type: str
    where: str | None  # the innermost frame of the registry's own code: ``path:line``
    expected: bool  # declared by the adapter's ``expected_errors``


_HARNESS_DIR = str(Path(__file__).resolve().parent)
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")})


def raised(exc: BaseException, adapter: object = None) -> Raised:
    """Classify *exc*, raised by a call to *adapter*: its type, the registry line it came from, and whether the
    adapter declares it (``expected_errors = (LockTimeout, ...)``: exceptions it raises by design when an outcome is
    unknown)."""
    where = None
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = str(Path(frame.filename).resolve()) if frame.filename and not frame.filename.startswith("<") else ""
        if path and not path.startswith(_HARNESS_DIR) and not path.startswith(_LIBRARY_DIRS):
            try:
                shown = os.path.relpath(path)
            except ValueError:
                shown = path
            where = f"{shown if not shown.startswith('..') else path}:{frame.lineno}"
            break
    expected = tuple(getattr(adapter, "expected_errors", ()) or ())
    return Raised(f"{type(exc).__name__}: {exc}", type(exc).__name__, where, isinstance(exc, expected))


@dataclass(frozen=True)
class Called:
    """What one adapter call did, as the contract classifies it: ``ok`` (it returned), ``fail`` (it raised Rejected:
    refused, nothing changed) or ``info`` (it raised anything else: it may or may not have happened)."""

    outcome: Outcome
    result: Any = None
    error: str = ""  # the refusal's message, or ``Type: message`` of what it raised
    raised: Raised | None = None  # for ``info``: what the exception says (type, registry line, declared or not)


def classify(fn: Callable[[], Any], adapter: object = None) -> Called:
    """Call *fn* (one call of *adapter*) and classify its outcome: the one classifier of the swarm and the bursts."""
    try:
        result = fn()
    except Rejected as exc:
        return Called("fail", None, str(exc))
    except Exception as exc:
        what = raised(exc, adapter)
        return Called("info", None, what.error, what)
    return Called("ok", result)


class Recorder:
    """Appends a worker's operations to its history file.  Cheap: one unbuffered write per event."""

    def __init__(self, path: Path, process: int) -> None:
        self.path = path
        self.process = process
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._next = 0

    def invoke(self, name: str, args: dict[str, Any], *, fault: bool = False) -> int:
        index = self._next
        self._next += 1
        line: dict[str, Any] = {"p": self.process, "i": index, "op": name, "args": args, "t": time.monotonic_ns()}
        if fault:
            line["fault"] = True
        os.write(self._fd, orjson.dumps(line, default=str) + b"\n")
        return index

    def complete(self, index: int, outcome: Outcome, result: Any = None, error: str | None = None,
                 raised: Raised | None = None) -> None:
        line: dict[str, Any] = {"p": self.process, "i": index, "t": time.monotonic_ns(), "outcome": outcome}
        if result is not None:
            line["result"] = result
        if error is not None:
            line["error"] = error
        if raised is not None:
            line.update(etype=raised.error_type, where=raised.where, expected=raised.expected)
        os.write(self._fd, orjson.dumps(line, default=str) + b"\n")

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def read_events(paths: Iterable[Path]) -> list[Op]:
    """Merge history files into operations; an invocation with no completion is ``info``."""
    invoked: dict[tuple[int, int], dict[str, Any]] = {}
    completed: dict[tuple[int, int], dict[str, Any]] = {}
    for path in paths:
        if not path.exists():
            continue
        for raw in path.read_bytes().splitlines():
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a line torn by a SIGKILL mid-write: its operation stays in flight
            key = (line["p"], line["i"])
            (completed if "outcome" in line else invoked)[key] = line
    ops = []
    for key, inv in invoked.items():
        done = completed.get(key)
        ops.append(Op(
            process=inv["p"], index=inv["i"], name=inv["op"], args=inv["args"], invoke_ns=inv["t"],
            complete_ns=None if done is None else done["t"],
            outcome="info" if done is None else done["outcome"],
            result=None if done is None else done.get("result"),
            error="the worker died before the operation returned" if done is None else done.get("error"),
            fault=inv.get("fault", False), error_type=None if done is None else done.get("etype"),
            where=None if done is None else done.get("where"),
            expected=False if done is None else done.get("expected", False)))
    ops.sort(key=lambda op: (op.invoke_ns, op.process, op.index))
    return ops


@dataclass
class History:
    """Every operation of one swarm, in invocation order, and what the registry looked like before it."""

    ops: list[Op]
    concurrency: int
    ops_per_process: int
    seed: int
    impl: str
    start_ns: int
    end_ns: int
    initial: dict[str, dict[str, Any]] = field(default_factory=dict)  # task id -> document before the swarm
    worker_exits: dict[int, int | None] = field(default_factory=dict)  # process -> exit code (< 0: signal)
    schedule: Any = None  # the ScheduleRun of a scheduled swarm (pytest_orch.schedule), None when free-running

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def calls(self) -> list[Op]:
        """The registry operations (no injected faults)."""
        return [op for op in self.ops if not op.fault]

    def count(self, outcome: Outcome) -> int:
        return sum(1 for op in self.calls if op.outcome == outcome)

    @property
    def seconds(self) -> float:
        return max(self.end_ns - self.start_ns, 1) / 1e9

    @property
    def throughput(self) -> float:
        return len(self.calls) / self.seconds

    def task_ids(self) -> list[str]:
        seen = dict.fromkeys(self.initial)
        for op in self.ops:
            if op.task_id is not None:
                seen.setdefault(op.task_id)
        return list(seen)

    def overlap(self) -> float:
        """The fraction of operations that ran at the same time as an operation of another process."""
        calls = sorted(self.calls, key=lambda op: op.invoke_ns)
        if len({op.process for op in calls}) < 2:
            return 0.0
        ends = [op.complete_ns if op.complete_ns is not None else self.end_ns for op in calls]
        overlapping = [False] * len(calls)
        for i, op in enumerate(calls):
            for j in range(i + 1, len(calls)):
                if calls[j].invoke_ns >= ends[i]:
                    break
                if calls[j].process != op.process:
                    overlapping[i] = overlapping[j] = True
        return sum(overlapping) / len(calls)

    def ms(self, ns: int | None) -> str:
        return "…" if ns is None else f"{(ns - self.start_ns) / 1e6:.1f}"

    def timeline(self, ops: Iterable[Op], limit: int | None = 30) -> str:
        """A few operations, one a line: process, operation, start and end in ms from the swarm's start, outcome."""
        chosen = sorted(set(ops), key=lambda op: (op.invoke_ns, op.process, op.index))
        lines = []
        limit = len(chosen) if limit is None else limit
        for op in chosen[:limit]:
            who = "harness" if op.process == HARNESS else f"p{op.process}"
            outcome = op.outcome + (f" -> {op.result}" if op.result is not None and op.outcome == "ok" else "")
            if op.error and op.outcome != "ok":
                outcome += f" ({op.error[:80]})"
            lines.append(f"    {who:>7}  {op.describe():<48} {self.ms(op.invoke_ns):>8} → {self.ms(op.complete_ns):>8}"
                         f" ms  {outcome}")
        if len(chosen) > limit:
            lines.append(f"    ... and {len(chosen) - limit} more (-vv shows them all)")
        return "\n".join(lines)
