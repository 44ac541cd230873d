"""A persistent pool of worker processes that run one burst of registry operations at the same instant.

Starting processes for every burst would cost more than the burst itself, and a Hypothesis run makes hundreds of
bursts.  So the pool keeps ``size`` workers alive for the whole session.  For each burst every worker is sent a
:class:`Job`: it opens the adapter for the job's workspace (``load_factory(impl)(workspace)``, cached until the
workspace or its generation changes), waits on a barrier shared by all workers, runs its one operation (or none, when
the burst is smaller than the pool) and reports a :class:`Record`: invoke and complete times (``time.monotonic_ns``,
one clock for every process on the machine) and the outcome.

Outcomes follow the adapter contract: a return is ``ok``, :class:`~pytest_orch.adapter.Rejected` is ``fail``, any
other exception is ``info``; a worker that dies or does not answer before the timeout leaves its operation ``info``
with no completion time, is killed, and the pool is rebuilt before the next burst.

Scheduled (``run(..., schedule="pct:3", schedule_seed=...)``, see :mod:`pytest_orch.schedule`): the workers still
meet at the barrier, then each waits at the beginning of its operation and at every file-system event for the
scheduler, a thread of this process, to let it go on.  The hook is installed for the one operation
(:func:`~pytest_orch.schedule.scheduled_op`) and taken off after it, so a persistent worker's next burst, scheduled or
not, starts clean.  The schedule taken comes back with the records (:attr:`Records.schedule`).  A worker's events
depend on its own past only where the registry's code does something once per process: libtmux asks tmux its version
on first use, one event more in a worker's first deploy.

>>> pool = shared_pool(4)                                                    # doctest: +SKIP
>>> records = pool.run("reference", workspace, [Op("reconcile", task_id)])  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .adapter import load_factory
from .errors import HarnessError
from .history import classify
from .schedule import EVENTS_PER_OP, Schedule, ScheduleRun, Turn, scheduled_op
from .tmux import kill_session

__all__ = ["MAX_WORKERS", "BurstError", "Job", "Op", "Record", "Records", "WorkerPool", "close_shared_pool",
           "perform", "shared_pool"]

#: The most workers a pool keeps; bursts are capped at this many operations.
MAX_WORKERS = 16

OpKind = Literal["create_task", "deploy", "update", "kill", "reconcile", "lose_session"]
Outcome = Literal["ok", "fail", "info"]


class BurstError(HarnessError):
    """The harness itself could not run a burst (an adapter that does not open, a broken pool)."""


@dataclass(frozen=True)
class Op:
    """One registry operation with real ids, as a worker runs it.

    ``lose_session`` is not a registry call: it kills the tmux session ``session`` behind the registry's back.
    """

    kind: OpKind
    task_id: str
    agent_id: str = ""
    agent_type: str = ""
    parent: str = "orchestrator"
    status: str = ""
    progress: int = 0
    session: str = ""
    limits: tuple[int, int, int] = (0, 0, 0)  # create_task: max_agents, max_concurrent, max_depth

    def __str__(self) -> str:
        if self.kind == "create_task":
            return "create_task(max_agents={}, max_concurrent={}, max_depth={})".format(*self.limits)
        if self.kind == "deploy":
            return f"deploy({self.agent_type!r}, parent={self.parent!r})"
        if self.kind == "update":
            return f"update({self.agent_id}, {self.status!r}, progress={self.progress})"
        if self.kind == "kill":
            return f"kill({self.agent_id})"
        if self.kind == "lose_session":
            return f"tmux kill-session {self.session}"
        return f"reconcile({self.task_id})"


@dataclass(frozen=True)
class Record:
    """What one operation of a burst did.  ``complete`` is None when the worker died or hung."""

    index: int
    op: Op
    invoke: int
    complete: int | None
    outcome: Outcome
    result: Any = None
    error: str = ""
    pid: int | None = None


class Records(list[Record]):
    """The records of one burst, in the order of its operations, and the schedule it took (None: free-running)."""

    schedule: ScheduleRun | None = None


@dataclass(frozen=True)
class Job:
    """What a worker is told for one burst: where, with which implementation, and which operation (if any)."""

    impl: str
    workspace: str
    generation: int
    env: Mapping[str, str]
    sys_path: Sequence[str]
    op: Op | None
    index: int
    barrier_timeout: float
    fifo_dir: str | None = None  # the scheduler's FIFOs when the burst is scheduled
    label: str = ""  # how the schedule names the operation


def perform(adapter: Any, op: Op) -> Any:
    """Run *op* on *adapter* and return its result (the new id for a create_task or a deploy, else None)."""
    if op.kind == "create_task":
        max_agents, max_concurrent, max_depth = op.limits
        return adapter.create_task(f"harness task {op.task_id}".strip(), max_agents=max_agents,
                                   max_concurrent=max_concurrent, max_depth=max_depth)
    if op.kind == "deploy":
        return adapter.deploy(op.task_id, op.agent_type, op.parent)
    if op.kind == "update":
        adapter.update(op.task_id, op.agent_id, op.status, op.progress)
    elif op.kind == "kill":
        adapter.kill(op.task_id, op.agent_id)
    elif op.kind == "reconcile":
        adapter.reconcile(op.task_id)
    elif op.kind == "lose_session":
        kill_session(op.session)
    else:  # pragma: no cover - Op.kind is a Literal
        raise ValueError(f"unknown operation kind {op.kind!r}")
    return None


def timed(adapter: Any, op: Op, index: int) -> Record:
    """Run *op* and classify its outcome as the contract says."""
    invoke = time.monotonic_ns()
    done = classify(lambda: perform(adapter, op), adapter)
    return Record(index, op, invoke, time.monotonic_ns(), done.outcome, done.result, done.error, os.getpid())


def _set_environ(env: Mapping[str, str]) -> None:
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    os.environ.update(env)


def _worker(conn: Any, barrier: Any) -> None:
    """A worker's loop: one Job in, one reply out, until told None."""
    cached: tuple[str, str, int] | None = None
    adapter: Any = None
    while True:
        try:
            job: Job | None = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if job is None:
            return
        setup_error = ""
        try:
            if list(sys.path) != list(job.sys_path):
                sys.path[:] = list(job.sys_path)
            _set_environ(job.env)
            key = (job.impl, job.workspace, job.generation)
            if key != cached:
                adapter, cached = None, None
                adapter = load_factory(job.impl)(Path(job.workspace))
                cached = key
        except Exception:
            setup_error = traceback.format_exc()
        try:
            barrier.wait(job.barrier_timeout)
        except threading.BrokenBarrierError:
            _reply(conn, ("broken", "the start barrier broke (a worker died or hung before the burst)"))
            continue
        if setup_error:
            _reply(conn, ("setup", setup_error))
        elif job.op is None:
            _reply(conn, ("idle", None))
        else:
            with scheduled_op(job.fifo_dir, job.index, job.workspace, job.op.kind, job.label or str(job.op)):
                record = timed(adapter, job.op, job.index)
            _reply(conn, ("done", record))


def _reply(conn: Any, reply: tuple[str, Any]) -> None:
    # The standard pickle, not dill's pure-Python one: a burst sends and receives a message per worker.
    try:
        data = pickle.dumps(reply)
    except Exception as exc:  # a result that does not pickle: say so rather than die
        data = pickle.dumps(("setup", f"the reply {reply!r:.200} does not pickle: {exc}"))
    conn.send_bytes(data)


@dataclass
class _Worker:
    process: Any
    conn: Any


@dataclass
class WorkerPool:
    """``size`` worker processes and their start barrier.  Use :func:`shared_pool` rather than building one."""

    size: int
    context: str = "forkserver"
    _workers: list[_Worker] = field(default_factory=list, init=False)
    _barrier: Any = field(default=None, init=False)
    _broken: bool = field(default=True, init=False)

    def _start(self) -> None:
        import multiprocess  # type: ignore[import-untyped]

        self._stop()
        ctx = multiprocess.get_context(self.context)
        self._barrier = ctx.Barrier(self.size)
        for n in range(self.size):
            parent_conn, child_conn = ctx.Pipe()
            process = ctx.Process(target=_worker, args=(child_conn, self._barrier), name=f"orch-burst-{n}",
                                  daemon=True)
            process.start()
            child_conn.close()
            self._workers.append(_Worker(process, parent_conn))
        self._broken = False

    def _stop(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(Exception):
                worker.conn.send_bytes(pickle.dumps(None))
        deadline = time.monotonic() + 2
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(1)
            with contextlib.suppress(Exception):
                worker.conn.close()
        self._workers = []

    def close(self) -> None:
        """Stop every worker."""
        self._stop()
        self._broken = True

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def run(self, impl: str, workspace: Path, ops: Sequence[Op], *, generation: int = 0, timeout: float = 300.0,
            env: Mapping[str, str] | None = None, schedule: str | None = None, schedule_seed: str = "0",
            turns: Sequence[Turn] | None = None, labels: Sequence[str] | None = None) -> Records:
        """Run *ops* at the same time, one per worker, and return one Record per op (in the order of *ops*).

        With *schedule* (``"random"`` or ``"pct:D"``) the burst is scheduled, seeded by *schedule_seed* or, for
        PCT, given its parameters (*turns*, one per op): operation i is process ``p<i>`` of the schedule, and
        begins as ``begin <labels[i]>`` (default: the Op).  Raises BurstError if there are more ops than workers, or
        if the workers could not start the burst.
        """
        if len(ops) > self.size:
            raise BurstError(f"a burst of {len(ops)} operations needs {len(ops)} workers; the pool has {self.size}")
        if self._broken or not all(w.process.is_alive() for w in self._workers):
            self._start()
        scheduler = None
        if schedule and ops:
            scheduler = Schedule(schedule, schedule_seed, expected_steps=len(ops) * EVENTS_PER_OP, turns=turns)
        taken = None
        try:
            records = self._run(impl, workspace, ops, generation, timeout, env, scheduler, labels)
        finally:
            if scheduler is not None:  # on the way out of an error too: no scheduler thread outlives its burst
                try:
                    taken = scheduler.stop()
                finally:
                    scheduler.close()
        records.schedule = taken
        return records

    def _run(self, impl: str, workspace: Path, ops: Sequence[Op], generation: int, timeout: float,
             env: Mapping[str, str] | None, scheduler: Schedule | None, labels: Sequence[str] | None) -> Records:
        from multiprocess.connection import wait  # type: ignore[import-untyped]

        fifo_dir = scheduler.open(len(ops)) if scheduler is not None else None
        start = time.monotonic_ns()
        env = dict(os.environ if env is None else env)
        for i, worker in enumerate(self._workers):
            op = ops[i] if i < len(ops) else None
            label = labels[i] if labels is not None and op is not None else str(op)
            worker.conn.send_bytes(pickle.dumps(Job(impl, str(workspace), generation, env, list(sys.path), op, i,
                                                    timeout, fifo_dir if op is not None else None, label)))
        if scheduler is not None:
            # Persistent workers: each one's sentinel says when it died, and its pid whether it is still working.
            scheduler.pids = [w.process.pid for w in self._workers[:len(ops)]]
            scheduler.start_thread([w.process.sentinel for w in self._workers[:len(ops)]], None)
        replies: dict[int, tuple[str, Any]] = {}
        pending = dict(enumerate(self._workers))
        deadline = time.monotonic() + timeout + 5
        while pending:
            waitables = [w.conn for w in pending.values()] + [w.process.sentinel for w in pending.values()]
            ready = wait(waitables, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for i, worker in list(pending.items()):
                if worker.conn in ready or worker.conn.poll():
                    try:
                        replies[i] = pickle.loads(worker.conn.recv_bytes())
                    except (EOFError, OSError):
                        replies[i] = ("died", None)
                    del pending[i]
                elif worker.process.sentinel in ready:
                    replies[i] = ("died", None)
                    del pending[i]
                    # If it died before the barrier, the others would wait there until the timeout.
                    with contextlib.suppress(Exception):
                        self._barrier.abort()
        for i, worker in pending.items():  # hung: kill it; its operation stays unknown
            worker.process.kill()
            replies[i] = ("hung", None)
        if pending or any(kind in ("died", "hung", "broken") for kind, _ in replies.values()):
            self._broken = True

        setup = [detail for kind, detail in replies.values() if kind == "setup"]
        if setup:
            self._broken = True
            raise BurstError(f"a worker could not open the adapter {impl!r} for {workspace}:\n{setup[0]}")
        records = Records()
        for i, op in enumerate(ops):
            kind, detail = replies[i]
            if kind == "done":
                records.append(detail)
            elif kind in ("died", "hung"):
                pid = self._workers[i].process.pid
                why = "the worker died" if kind == "died" else f"the worker did not answer within {timeout:g}s"
                # It was invoked no earlier than the burst started: the soundest invoke time we know.
                records.append(Record(i, op, start, None, "info", None, why, pid))
            else:
                self._broken = True
                raise BurstError(f"worker {i} could not run its operation: {detail}")
        return records


_shared: WorkerPool | None = None


def shared_pool(size: int) -> WorkerPool:
    """The session's pool, (re)built with *size* workers (at most :data:`MAX_WORKERS`) when it has another size."""
    global _shared
    size = max(1, min(size, MAX_WORKERS))
    if _shared is None or _shared.size != size:
        close_shared_pool()
        _shared = WorkerPool(size)
    return _shared


def close_shared_pool() -> None:
    """Stop the session's pool, if there is one (also done at exit)."""
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None


atexit.register(close_shared_pool)
