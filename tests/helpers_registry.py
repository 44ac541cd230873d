"""Helpers for the registry's tests: real processes, real locks, an independent read counter, workspace snapshots.

Everything that runs in a child process lives here, at module level, so that a ``spawn`` child can import it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_module
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any

from registry import Registry
from registry.legacy import LegacyRegistry
from registry.store import set_crash_hook

# --------------------------------------------------------------------------------------------------------------------
# Processes


def spawn() -> SpawnContext:
    """Fresh interpreters: a child inherits no crash hook, no audit hook, no lock object of the test process."""
    return multiprocessing.get_context("spawn")


def _call_and_report(queue: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as exc:  # the exception itself crosses the boundary: every RegistryError pickles
        queue.put(("raised", exc))


def run_in_child(fn: Callable[..., Any], *args: Any, timeout: float = 60) -> tuple[int | None, Any]:
    """Run ``fn(*args)`` in a fresh process; return its exit code and ``("ok", result)``, ``("raised", exc)`` or None.

    None means the child died without a word (``os._exit`` in a crash hook, a signal).
    """
    ctx = spawn()
    queue = ctx.Queue()
    proc = ctx.Process(target=_call_and_report, args=(queue, fn, args))
    proc.start()
    outcome = None
    deadline = time.monotonic() + timeout
    while outcome is None and time.monotonic() < deadline:
        try:
            outcome = queue.get(timeout=0.05)
        except queue_module.Empty:
            if not proc.is_alive() and queue.empty():
                break
    proc.join(max(deadline - time.monotonic(), 1))
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"the child running {fn.__name__} did not finish within {timeout} s")
    return proc.exitcode, outcome


def crash_at(point: str, path_suffix: str, exit_code: int) -> None:
    """Install a crash hook that kills this process at *point* for the first file whose path ends with *path_suffix*."""

    def hook(where: str, path: Path) -> None:
        if where == point and str(path).endswith(path_suffix):
            os._exit(exit_code)

    set_crash_hook(hook)


def crash_during(base: str, operation: str, args: tuple[Any, ...], point: str, path_suffix: str) -> Any:
    """In a child: open the registry, arm a crash at *point*, run ``Registry.<operation>(*args)``."""
    reg = Registry(base)
    crash_at(point, path_suffix, 17)
    return getattr(reg, operation)(*args)


class LockHolder:
    """Another real process that holds the filelock on *lock_path* until :meth:`release`.

    Just before it lets go it creates *released_marker*, so a waiter can prove it did not proceed before the release.
    """

    SCRIPT = textwrap.dedent("""
        import sys, pathlib, filelock
        lock = filelock.FileLock(sys.argv[1], thread_local=False)
        lock.acquire()
        print("locked", flush=True)
        sys.stdin.read()
        pathlib.Path(sys.argv[2]).touch()
        lock.release()
    """)

    def __init__(self, lock_path: Path, released_marker: Path) -> None:
        self.marker = released_marker
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(lock_path), str(released_marker)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", f"the lock holder did not take {lock_path}: {line!r}"

    def release(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    def release_later(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.release)
        timer.start()
        return timer

    def __enter__(self) -> LockHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.proc.wait(30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


# --------------------------------------------------------------------------------------------------------------------
# Counting reads independently of registry.store.io_stats


@dataclass
class _Counts:
    watched: dict[str, str] = field(default_factory=dict)  # realpath -> name
    reads: dict[str, int] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)
    active: bool = False


_COUNTS = _Counts()
_HOOKED = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not _COUNTS.active:
        return
    path, mode, flags = args
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # a descriptor
    name = _COUNTS.watched.get(os.path.realpath(os.fsdecode(path)))
    if name is None:
        return
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        mode is None and flags & (os.O_WRONLY | os.O_RDWR))
    table = _COUNTS.writes if writing else _COUNTS.reads
    table[name] = table.get(name, 0) + 1


@contextlib.contextmanager
def count_opens(**paths: Path) -> Iterator[_Counts]:
    """Count the opens of each named file for reading and for writing, seen by the interpreter's "open" audit event.

    >>> with count_opens(task=task_path, glob=global_path) as counts:   # doctest: +SKIP
    ...     reg.deploy(...)
    >>> counts.reads["task"]                                          # doctest: +SKIP
    """
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)  # cannot be removed: it stays inert while no counting is active
        _HOOKED = True
    _COUNTS.watched = {os.path.realpath(p): name for name, p in paths.items()}
    _COUNTS.reads = dict.fromkeys(paths, 0)
    _COUNTS.writes = dict.fromkeys(paths, 0)
    _COUNTS.active = True
    try:
        yield _COUNTS
    finally:
        _COUNTS.active = False


# --------------------------------------------------------------------------------------------------------------------
# Workspace snapshots


def snapshot(root: Path, *, skip_locks: bool = False) -> dict[str, tuple[bytes, int]]:
    """Every file under *root*: relative path -> (bytes, mtime_ns).  Equal snapshots mean nothing was written."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not (skip_locks and path.name.endswith(".lock")):
            out[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


# --------------------------------------------------------------------------------------------------------------------
# tmux behind the registry's back


def tmux_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real tmux command line on whatever server the environment (TMUX_TMPDIR) points at."""
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False)


def fake_tmux(directory: Path, *, stderr: str, code: int) -> Path:
    """An executable that answers every tmux command with *stderr* and exit *code*: an injected tmux failure."""
    path = directory / "fake-tmux"
    path.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit {code}\n")
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------------------------------------------------
# The concurrent workload of the "Done when" test


def workload(impl: str, base: str, task_ids: list[str], worker: int, rounds: int, barrier: Any) -> dict[str, Any]:
    """One process of the concurrent test: deploy, update and kill its own agents on shared tasks.

    Returns what was acknowledged: ``deployed`` (agent id -> task id), ``final`` (agent id -> the status its last
    acknowledged transition set), ``reaped`` (what reconcile took, which must be nothing: every session is alive),
    and ``errors`` (repr of every exception).  Agents of a worker have its own type, so deduplication never refuses.
    """
    reg: Registry | LegacyRegistry = Registry(base) if impl == "reference" else LegacyRegistry(base)
    deployed: dict[str, str] = {}
    final: dict[str, str] = {}
    reaped: list[str] = []
    errors: list[str] = []

    def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            errors.append(f"{fn.__name__}{args}: {type(exc).__name__}: {exc}")
            return None

    barrier.wait()
    for r in range(rounds):
        task_id = task_ids[(worker + r) % len(task_ids)]
        agent = attempt(reg.deploy, task_id, f"w{worker}", f"worker {worker} round {r}")
        if agent is None:
            continue
        agent_id = agent["id"]
        deployed[agent_id] = task_id
        final[agent_id] = "running"
        if attempt(reg.update, task_id, agent_id, "working", f"round {r}", 30) is not None:
            final[agent_id] = "working"
        attempt(reg.update, task_id, agent_id, None, "halfway", 60)
        if r == rounds - 1 and worker % 2:
            continue  # leave some agents active at the end
        ending = (worker + r) % 3
        if ending == 2:
            if attempt(reg.kill, task_id, agent_id, f"worker {worker} is done with it") is not None:
                final[agent_id] = "terminated"
            continue
        status = "completed" if ending == 0 else "failed"
        if attempt(reg.update, task_id, agent_id, status, "finished", 100) is not None:
            final[agent_id] = status
        # The agent's process ends when it finishes; its session goes with it.
        attempt(reg.sessions.kill, agent["tmux_session"])
        if r % 2 == 0:
            reaped += attempt(reg.reconcile, task_id) or []
    return {"deployed": deployed, "final": final, "reaped": reaped, "errors": errors}


def _workload_into(queue: Any, *args: Any) -> None:
    try:
        queue.put(workload(*args))
    except BaseException as exc:
        queue.put({"crashed": f"{type(exc).__name__}: {exc}"})


def run_workload(impl: str, base: Path, task_ids: list[str], workers: int, rounds: int) -> list[dict[str, Any]]:
    """Run :func:`workload` in *workers* real processes that start together; return their reports."""
    ctx = spawn()
    barrier = ctx.Barrier(workers)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_workload_into, args=(queue, impl, str(base), task_ids, w, rounds, barrier))
             for w in range(workers)]
    for proc in procs:
        proc.start()
    try:
        reports = [queue.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    crashed = [r["crashed"] for r in reports if "crashed" in r]
    assert not crashed, f"workers crashed: {crashed}"
    return reports


def lost_updates(reports: list[dict[str, Any]], read_task: Callable[[str], dict[str, Any]],
                 read_global: Callable[[], dict[str, Any]], task_ids: list[str]) -> list[str]:
    """Everything the final registries lost or got wrong against what the workers were told; empty when nothing."""
    problems: list[str] = []
    deployed = {a: t for r in reports for a, t in r["deployed"].items()}
    final = {a: s for r in reports for a, s in r["final"].items()}
    tasks: dict[str, dict[str, Any]] = {}
    for task_id in task_ids:
        try:
            tasks[task_id] = read_task(task_id)
        except Exception as exc:
            problems.append(f"task {task_id} cannot be read: {type(exc).__name__}: {exc}")
    try:
        glob: dict[str, Any] | None = read_global()
    except Exception as exc:
        glob = None
        problems.append(f"the global registry cannot be read: {type(exc).__name__}: {exc}")
    for task_id, task in tasks.items():
        agents = {a["id"]: a for a in task["agents"]}
        mine = {a: s for a, s in final.items() if deployed[a] == task_id}
        for agent_id, status in mine.items():
            if agent_id not in agents:
                problems.append(f"acknowledged deploy {agent_id} is missing from task {task_id}")
            elif agents[agent_id]["status"] != status:
                problems.append(f"agent {agent_id} is {agents[agent_id]['status']}, its last acknowledged update"
                                f" made it {status}")
        want = {"total_spawned": len(mine),
                "active_count": sum(1 for s in mine.values() if s in ("running", "working")),
                "completed_count": sum(1 for s in mine.values() if s == "completed")}
        for key, value in want.items():
            if task.get(key) != value:
                problems.append(f"task {task_id} has {key} {task.get(key)}, the acknowledged operations give {value}")
        extra = set(agents) - set(mine)
        if extra:
            problems.append(f"task {task_id} holds agents nobody was told about: {sorted(extra)}")
    if glob is not None:
        for agent_id, status in final.items():
            view = glob.get("agents", {}).get(agent_id)
            if view is None:
                problems.append(f"acknowledged deploy {agent_id} is missing from the global registry")
            elif view.get("status") != status:
                problems.append(f"the global registry has {agent_id} {view.get('status')}, acknowledged {status}")
        if glob.get("total_agents_spawned") != len(final):
            problems.append(f"global total_agents_spawned is {glob.get('total_agents_spawned')}, {len(final)} deploys"
                            " were acknowledged")
        active = sum(1 for s in final.values() if s in ("running", "working"))
        if glob.get("active_agents") != active:
            problems.append(f"global active_agents is {glob.get('active_agents')}, acknowledged {active}")
    return problems
