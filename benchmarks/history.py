"""Workspaces with a long history, for issue 14's benchmark: cost of a deploy and a status change as history grows.

A workspace that has run *n* agents: ``n // OLD_TASK_AGENTS`` old task registries of ``OLD_TASK_AGENTS`` terminal
agents each (copies of the sample agents, unique ids), and one current task (the 13-agent shape of the samples, 10
of them active, room for more) into which the benchmark deploys and whose agents change status.  The global
registry is written as a workspace upgraded from before the archive has it: every agent in ``GLOBAL_REGISTRY.json``.
:func:`settle` then runs one status change through the registry under test, which (for the reference) moves the
terminal agents to the archive, as the first write of an upgraded workspace does; the files as they are then are
what every round restores.

    python -m benchmarks.history              # the same measurement, interleaved, printed (no pytest-benchmark)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from registry import Registry, archive, model
from registry.sessions import TmuxSessions
from registry.store import dumps

from .workspace import build_task

SIZES = (100, 1_000, 10_000, 50_000)
#: Agents of each old task: the orchestrator's default max_agents.
OLD_TASK_AGENTS = model.DEFAULT_MAX_AGENTS
CURRENT_TASK = "TASK-20251201-090000-c0ffee00"
#: The registry variants measured: the reference as it is, and with its archive turned off (the global registry
#: keeps every agent: the reference before issue 14).
VARIANTS: dict[str, int | None] = {"reference": archive.ARCHIVE_AFTER, "before: no archive": None}


@dataclass
class HistoryWorkspace:
    base: Path
    agents: int
    task_id: str
    active: list[str]
    files: dict[Path, bytes]

    def restore(self) -> None:
        """Put back the bytes :func:`settle` left (outside the timings; not durable).

        Only files that changed are written: rewriting the 15 MB archive would leave dirty pages that the next
        fsync in the timed operation has to flush (ext4's ordered mode), which no real operation does.
        """
        for path, data in self.files.items():
            try:
                same = path.read_bytes() == data
            except FileNotFoundError:
                same = False
            if not same:
                path.write_bytes(data)
        for path in (archive.archive_path(self.global_path), archive.ids_path(self.global_path)):
            if path not in self.files:
                path.unlink(missing_ok=True)

    @property
    def global_path(self) -> Path:
        return self.base / model.GLOBAL_DIR / model.GLOBAL_FILE

    def registry(self, sessions: TmuxSessions, variant: str) -> Registry:
        reg = Registry(self.base, sessions=sessions, heal=False)
        reg.archive_after = VARIANTS[variant]
        return reg


def _old_tasks(n_agents: int) -> list[dict[str, Any]]:
    template = build_task(OLD_TASK_AGENTS, active=0)
    template_bytes = orjson.dumps(template)
    tasks = []
    for k in range((n_agents + OLD_TASK_AGENTS - 1) // OLD_TASK_AGENTS):
        task = orjson.loads(template_bytes)
        task_id = f"TASK-20250101-{k // 1000:06d}-{k % 1000:04d}beef"
        task.update(task_id=task_id, task_description=f"old task {k} of the benchmark history", status="completed")
        renamed = {}
        for i, agent in enumerate(task["agents"][:n_agents - k * OLD_TASK_AGENTS]):
            new_id = f"{agent['type'][:30]}-{k:06d}-{i:06x}"
            renamed[agent["id"]] = new_id
            agent.update(id=new_id, tmux_session=model.session_name(new_id))
        task["agents"] = task["agents"][:len(renamed)]
        for agent in task["agents"]:
            agent["parent"] = renamed.get(agent["parent"], agent["parent"])
            if agent["parent"] not in {a["id"] for a in task["agents"]}:
                agent.update(parent=model.ORCHESTRATOR, depth=1)
        task["agent_hierarchy"] = model.hierarchy_from_parents(task["agents"])
        model.recompute_task_counters(task)
        tasks.append(task)
    return tasks


def build(base: Path, n_agents: int) -> HistoryWorkspace:
    """Write a workspace that has run *n_agents* agents before the current task's (see the module docstring)."""
    current = build_task(13, active=10, task_id=CURRENT_TASK)
    tasks = [*_old_tasks(n_agents), current]
    glob = model.new_global_document("2025-01-01T00:00:00")
    for task in tasks:
        task.update(workspace=str(base / task["task_id"]), workspace_base=str(base))
        path = base / task["task_id"] / model.TASK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dumps(task))
        model.sync_global(glob, task, task["created_at"])
    (base / model.GLOBAL_DIR).mkdir(parents=True, exist_ok=True)
    (base / model.GLOBAL_DIR / model.GLOBAL_FILE).write_bytes(dumps(glob))
    active = [a["id"] for a in current["agents"] if model.is_active(a)]
    return HistoryWorkspace(base, n_agents, CURRENT_TASK, active, {})


def settle(ws: HistoryWorkspace, sessions: TmuxSessions, variant: str) -> None:
    """One status change and back, through the registry under test; then remember the files for :meth:`restore`."""
    reg = ws.registry(sessions, variant)
    reg.update(ws.task_id, ws.active[-1], "blocked")
    reg.update(ws.task_id, ws.active[-1], "working")
    paths = [ws.base / ws.task_id / model.TASK_FILE, ws.global_path, archive.archive_path(ws.global_path),
             archive.ids_path(ws.global_path)]
    ws.files = {p: p.read_bytes() for p in paths if p.exists()}


def file_sizes(ws: HistoryWorkspace) -> dict[str, int]:
    return {"global_file_bytes": ws.files.get(ws.global_path, b"").__len__(),
            "archive_bytes": ws.files.get(archive.archive_path(ws.global_path), b"").__len__()}


def status_change(reg: Registry, ws: HistoryWorkspace, seq: int) -> None:
    """Agent ``seq % 9`` of the current task goes working -> blocked (the task and the global registry written)."""
    reg.update(ws.task_id, ws.active[seq % (len(ws.active) - 1)], "blocked")


def deploy(reg: Registry, ws: HistoryWorkspace) -> str:
    agent: dict[str, Any] = reg.deploy(ws.task_id, "bench_history_deployer", "benchmark deploy")
    return str(agent["id"])


def main(argv: Sequence[str] | None = None) -> int:
    """Interleaved: every round measures each size and variant once, in a random order; prints medians and ratios."""
    from .workloads import NullSessions

    parser = argparse.ArgumentParser(prog="python -m benchmarks.history")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args(argv)
    sessions = NullSessions()
    root = Path(tempfile.mkdtemp(prefix="orch-history-"))
    spaces: dict[tuple[int, str], HistoryWorkspace] = {}
    for size in args.sizes:
        for variant in args.variants:
            ws = build(root / f"{size}-{variant.split(':')[0]}", size)
            settle(ws, sessions, variant)
            spaces[size, variant] = ws
    times: dict[tuple[int, str, str], list[float]] = {}
    cases = [(s, v, op) for s, v in spaces for op in ("deploy", "status")]
    for r in range(args.rounds):
        random.shuffle(cases)
        for size, variant, op in cases:
            ws = spaces[size, variant]
            ws.restore()
            reg = ws.registry(sessions, variant)
            t0 = time.perf_counter()
            if op == "deploy":
                deploy(reg, ws)
            else:
                status_change(reg, ws, r)
            times.setdefault((size, variant, op), []).append(time.perf_counter() - t0)
    print(f"load average {os.getloadavg()}; {args.rounds} rounds, registry-only (tmux stubbed)")
    for variant in args.variants:
        for op in ("deploy", "status"):
            base = statistics.median(times[args.sizes[0], variant, op])
            cells = [f"{statistics.median(times[s, variant, op]) * 1e3:8.2f} ms"
                     f" ({statistics.median(times[s, variant, op]) / base:5.2f}x)" for s in args.sizes]
            print(f"{variant:>20} {op:>7}: " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
