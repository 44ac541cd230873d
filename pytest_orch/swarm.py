"""N real processes against one registry: started together on a barrier, bounded by a deadline, always reaped.

Workers are forked with the ``multiprocess`` package, so a workload may be a closure defined inside a test.  Each
worker opens its own adapter (``factory(workspace)``), waits at the barrier with the others and the test process,
then runs the workload.  Every registry call the workload makes through ``worker.registry`` is recorded.

Each worker leads its own process group.  On the deadline every live worker is asked for its stack (faulthandler on
SIGUSR1), then its whole group is killed, and the swarm fails with the stacks.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import multiprocess  # type: ignore[import-untyped]

from .adapter import load_factory
from .errors import OrchFailure
from .history import History, Op, Outcome, Recorder, classify, read_events
from .schedule import child as _scheduled_child
from .spec import rules_of
from .tmux import kill_session

__all__ = ["SwarmError", "SwarmTimeout", "Worker", "Workload", "run_swarm"]

_START_TIMEOUT = 120.0


class SwarmError(OrchFailure):
    """The swarm could not run: a worker failed to open its adapter, or the workload itself raised."""


class SwarmTimeout(SwarmError):
    """The swarm ran past its deadline; the message holds every live worker's stack."""


class Worker:
    """What a workload gets: its process number, a seeded ``rng``, the op budget, and the recorded ``registry``."""

    def __init__(self, process: int, ops: int, seed: str, workspace: Path, adapter: Any, recorder: Recorder,
                 shared: dict[str, Any]) -> None:
        self.process = process
        self.ops = ops
        self.rng = random.Random(seed)
        self.workspace = workspace
        self.adapter = adapter
        self.shared = shared
        self.last: Outcome | None = None
        self._recorder = recorder
        self.registry = _Recorded(self)

    def call(self, name: str, fn: Callable[[], Any], *, fault: bool = False, **args: Any) -> Any:
        """Run *fn* as operation *name* with *args* recorded; return its result, or None if it did not succeed."""
        index = self._recorder.invoke(name, args, fault=fault)
        done = classify(fn, self.adapter)
        self.last = done.outcome
        if done.outcome == "ok":
            shown = done.result if isinstance(done.result, str | int | float | bool) else None
            self._recorder.complete(index, "ok", shown)
            return done.result
        self._recorder.complete(index, done.outcome, error=done.error, raised=None if fault else done.raised)
        return None

    def kill_session(self, session: str) -> bool:
        """Kill tmux session *session* behind the registry's back (a recorded fault).  True if it was there."""
        killed = self.call("tmux_kill", lambda: kill_session(session), fault=True, session=session)
        return bool(killed)


class _Recorded:
    """The adapter's contract, with every call recorded.  Methods return None when the call did not succeed."""

    def __init__(self, worker: Worker) -> None:
        self._w = worker
        self._a = worker.adapter
        self._progress = rules_of(worker.adapter).progress

    def create_task(self, description: str, *, max_agents: int, max_concurrent: int, max_depth: int) -> str | None:
        result: str | None = self._w.call(
            "create_task", lambda: self._a.create_task(description, max_agents=max_agents,
                                                       max_concurrent=max_concurrent, max_depth=max_depth),
            description=description, max_agents=max_agents, max_concurrent=max_concurrent, max_depth=max_depth)
        return result

    def deploy(self, task_id: str, agent_type: str, parent: str = "orchestrator") -> str | None:
        result: str | None = self._w.call("deploy", lambda: self._a.deploy(task_id, agent_type, parent),
                                          task_id=task_id, type=agent_type, parent=parent)
        return result

    def update(self, task_id: str, agent_id: str, status: str, progress: int) -> bool:
        shown: dict[str, Any] = {"progress": progress} if self._progress else {}  # none for a registry without
        self._w.call("update", lambda: self._a.update(task_id, agent_id, status, progress), task_id=task_id,
                     agent_id=agent_id, status=status, **shown)
        return self._w.last == "ok"

    def kill(self, task_id: str, agent_id: str) -> bool:
        self._w.call("kill", lambda: self._a.kill(task_id, agent_id), task_id=task_id, agent_id=agent_id)
        return self._w.last == "ok"

    def reconcile(self, task_id: str) -> bool:
        self._w.call("reconcile", lambda: self._a.reconcile(task_id), task_id=task_id)
        return self._w.last == "ok"

    def read_task(self, task_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self._w.call("read_task", lambda: self._a.read_task(task_id),
                                                     task_id=task_id)
        return result


Workload = Callable[[Worker], None]


def _worker_main(process: int, factory_spec: str, workspace: Path, workload: Workload, run_dir: Path,
                 barrier: Any, seed: str, ops: int, shared: dict[str, Any]) -> None:
    os.setpgrp()
    stack_file = open(run_dir / f"worker-{process}.stack", "w")  # noqa: SIM115 - open until the process ends
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    error_path = run_dir / f"worker-{process}.error"
    try:
        adapter = load_factory(factory_spec)(workspace)
    except BaseException:
        error_path.write_text(f"opening the adapter {factory_spec} failed:\n{traceback.format_exc()}")
        barrier.abort()
        raise SystemExit(3) from None
    recorder = Recorder(run_dir / f"worker-{process}.jsonl", process)
    worker = Worker(process, ops, seed, workspace, adapter, recorder, shared)
    _scheduled_child(worker)  # a no-op unless the swarm is scheduled (--orch-schedule)
    try:
        barrier.wait(_START_TIMEOUT)
    except Exception:
        raise SystemExit(5) from None
    try:
        workload(worker)
    except BaseException:
        error_path.write_text(f"the workload raised in process {process}:\n{traceback.format_exc()}")
        raise SystemExit(4) from None
    finally:
        recorder.close()


class SwarmHandle:
    """Given to a ``during`` callback, which runs in a thread of the test process while the swarm runs."""

    def __init__(self, processes: list[Any], start_ns: int, recorder: Recorder, run_dir: Path) -> None:
        self.processes = processes
        self.start_ns = start_ns
        self.recorder = recorder
        self.run_dir = run_dir
        self.done = threading.Event()

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.processes) if p.is_alive()]

    def in_flight(self) -> list[int]:
        """Live workers in the middle of an operation: their history file ends with an invocation."""
        busy = []
        for i in self.alive():
            try:
                with open(self.run_dir / f"worker-{i}.jsonl", "rb") as fh:
                    fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
                    last = fh.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
            except OSError:
                continue
            if last and b'"outcome"' not in last:
                busy.append(i)
        return busy

    def sigkill(self, process: int) -> None:
        """SIGKILL worker *process* (and its process group), recorded as a fault."""
        pid = self.processes[process].pid
        index = self.recorder.invoke("sigkill", {"process": process}, fault=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.recorder.complete(index, "ok")


def run_swarm(factory_spec: str, workspace: Path, workload: Workload, *, concurrency: int, ops: int, seed: int,
              timeout: float, label: str = "", shared: dict[str, Any] | None = None,
              initial: dict[str, dict[str, Any]] | None = None,
              during: Callable[[SwarmHandle], None] | None = None, schedule: Any = None) -> History:
    """Run *workload* in *concurrency* processes against the registry at *workspace*; return the History.

    Raises SwarmError if a worker cannot open its adapter or the workload raises, and SwarmTimeout (with every live
    worker's stack) if the swarm is not done within *timeout* seconds.  With *schedule*
    (a :class:`pytest_orch.schedule.Schedule`) the workers take turns at every file-system event.
    """
    from .history import HARNESS

    ctx = multiprocess.get_context("fork")
    run_dir = Path(tempfile.mkdtemp(prefix="orch-swarm-"))
    barrier = ctx.Barrier(concurrency + 1)
    processes = [
        ctx.Process(target=_worker_main, name=f"orch-worker-{i}",
                    args=(i, factory_spec, workspace, workload, run_dir, barrier, f"{seed}:{label}:{i}", ops,
                          dict(shared or {})))
        for i in range(concurrency)
    ]
    harness = Recorder(run_dir / "harness.jsonl", HARNESS)
    try:
        if schedule is not None:
            schedule.fork(concurrency, ops)
        for p in processes:
            p.start()
        try:
            barrier.wait(_START_TIMEOUT)
        except Exception:
            for p in processes:
                p.join(5)
            raise SwarmError(_errors(run_dir) or "the workers did not all reach the start barrier") from None
        start_ns = time.monotonic_ns()
        handle = SwarmHandle(processes, start_ns, harness, run_dir)
        if schedule is not None:
            schedule.start(handle)
        thread = None
        if during is not None:
            thread = threading.Thread(target=during, args=(handle,), name="orch-during", daemon=True)
            thread.start()
        deadline = time.monotonic() + timeout
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
        end_ns = time.monotonic_ns()
        handle.done.set()
        taken = schedule.stop() if schedule is not None else None
        if thread is not None:
            thread.join(10)
        late = [i for i, p in enumerate(processes) if p.is_alive()]
        if late:
            stacks = _dump_stacks(processes, late, run_dir)
            raise SwarmTimeout(f"the swarm ran past its {timeout:g} s deadline (--orch-timeout); {len(late)} of"
                               f" {concurrency} workers were still running and were killed. Their stacks:\n{stacks}")
        errors = _errors(run_dir)
        if errors:
            raise SwarmError(errors)
        harness.close()
        ops_seen: list[Op] = read_events([*run_dir.glob("worker-*.jsonl"), run_dir / "harness.jsonl"])
        # Workers leave the barrier a moment before the test process does: start at whoever started first.
        start_ns = min([start_ns, *(op.invoke_ns for op in ops_seen)])
        return History(ops=ops_seen, concurrency=concurrency, ops_per_process=ops, seed=seed, impl=factory_spec,
                       start_ns=start_ns, end_ns=end_ns, initial=dict(initial or {}),
                       worker_exits={i: p.exitcode for i, p in enumerate(processes)}, schedule=taken)
    finally:
        for p in processes:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.join(5)
        with contextlib.suppress(OSError):
            harness.close()
        if schedule is not None:
            schedule.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _errors(run_dir: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(run_dir.glob("worker-*.error")))


def _dump_stacks(processes: list[Any], late: list[int], run_dir: Path) -> str:
    for i in late:
        with contextlib.suppress(ProcessLookupError):
            os.kill(processes[i].pid, signal.SIGUSR1)
    time.sleep(0.5)
    for i in late:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(processes[i].pid, signal.SIGKILL)
        processes[i].join(5)
    parts = []
    for i in late:
        path = run_dir / f"worker-{i}.stack"
        parts.append(f"--- worker {i} (pid {processes[i].pid}) ---\n"
                     + (path.read_text().strip() if path.exists() else "(no stack was written)"))
    return "\n".join(parts)
