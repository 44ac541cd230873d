"""Registries of realistic shape and chosen size, written straight to disk for the benchmarks.

Agents are copies of the agents in ``shared/samples/orchestrator-2025-10`` (the real orchestrator's files: prompts,
``completion_validation`` blocks, timestamps), given fresh unique ids and mostly terminal statuses, so that a registry
of 10,000 agents has the byte shape of a real one, only longer.  When the samples are not there (a bare clone), a
built-in copy of one sample agent stands in.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from registry import model
from registry.store import dumps

SAMPLES = Path(os.environ.get("ORCH_SAMPLES") or Path(__file__).resolve().parents[2] / "shared" / "samples"
               / "orchestrator-2025-10" / ".agent-workspace")
#: The 20 KB task registry of the samples: 13 agents, one of them working.
SAMPLE_TASK = "TASK-20251017-215604-df6a3cbd"

#: The agent type every deploy benchmark deploys; no pre-populated agent has it, so deduplication never refuses it.
DEPLOY_TYPE = "bench_deployer"

_FALLBACK_AGENT: dict[str, Any] = {
    "id": "current_implementation_investigator-215637-4722d7",
    "type": "current_implementation_investigator",
    "tmux_session": "agent_current_implementation_investigator-215637-4722d7",
    "parent": "orchestrator",
    "depth": 1,
    "status": "completed",
    "started_at": "2025-10-17T21:56:39.948962",
    "progress": 100,
    "last_update": "2025-10-17T21:59:51.549066",
    "prompt": "You are investigating the current agent deployment and output capture implementation.\n\n"
              "YOUR MISSION:\n1. Analyze real_mcp_server.py to understand:\n"
              "   - How deploy_headless_agent currently works\n   - Ho...",
    "completion_validation": {
        "confidence": 1.0, "warnings": [], "blocking_issues": [],
        "evidence_summary": {
            "workspace_evidence": {"modified_files_count": 15, "progress_entries_count": 4, "findings_count": 3},
            "type_specific": {},
            "message_validation": {"length": 617, "suspicious_phrases_found": [],
                                   "evidence_keywords_found": ["reported", "documented"]},
            "progress_pattern": {"pattern": "normal", "elapsed_seconds": 191.599808, "speed": "reasonable",
                                 "working_updates_count": 3},
        },
        "validated_at": "2025-10-17T21:59:51.551036",
    },
    "completed_at": "2025-10-17T21:59:51.551133",
}


@functools.cache
def sample_task_bytes() -> bytes | None:
    """The raw bytes of the sample task registry, or None without the samples."""
    path = SAMPLES / SAMPLE_TASK / model.TASK_FILE
    return path.read_bytes() if path.is_file() else None


@functools.cache
def _templates() -> tuple[bytes, ...]:
    agents: list[dict[str, Any]] = []
    if SAMPLES.is_dir():
        for path in sorted(SAMPLES.glob(f"*/{model.TASK_FILE}")):
            agents.extend(orjson.loads(path.read_bytes()).get("agents", []))
    return tuple(orjson.dumps(a) for a in agents) or (orjson.dumps(_FALLBACK_AGENT),)


def sample_task() -> dict[str, Any]:
    """The sample task registry (a synthetic one of 13 agents without the samples)."""
    raw = sample_task_bytes()
    if raw is not None:
        doc: dict[str, Any] = orjson.loads(raw)
        return doc
    return build_task(13, active=1, task_id=SAMPLE_TASK)


def build_task(n_agents: int, *, active: int | None = None, task_id: str = "TASK-20251101-120000-b3c4d5e6",
               extra_capacity: int = 100_000) -> dict[str, Any]:
    """A task registry of *n_agents* agents shaped like the samples, with consistent counters and hierarchy.

    *active* agents (default: 1 %, at least 1) are ``working``, each of its own type; the rest are terminal
    (90 % completed, the others terminated or failed).  One agent in ten is the child of an earlier top-level agent.
    The limits leave room for *extra_capacity* more agents, all of which may be active.
    """
    templates = _templates()
    n_active = max(1, n_agents // 100) if active is None else active
    agents: list[dict[str, Any]] = []
    hierarchy: dict[str, list[str]] = {model.ORCHESTRATOR: []}
    top_level: list[dict[str, Any]] = []
    for i in range(n_agents):
        agent: dict[str, Any] = orjson.loads(templates[i % len(templates)])
        base_type = str(agent.get("type", "agent"))
        agent_type = f"{base_type}_{i}" if i < n_active else base_type
        agent_id = f"{agent_type}-{(213000 + i // 100) % 240000:06d}-{i:06x}"
        agent.update(id=agent_id, type=agent_type, tmux_session=model.session_name(agent_id))
        if i % 10 == 9 and top_level:
            parent = top_level[(i // 10) % len(top_level)]
            agent.update(parent=parent["id"], depth=parent["depth"] + 1)
        else:
            agent.update(parent=model.ORCHESTRATOR, depth=1)
            top_level.append(agent)
        for key in ("completed_at", "terminated_at", "termination_reason"):
            agent.pop(key, None)
        if i < n_active:
            agent.update(status="working", progress=40)
            agent.pop("completion_validation", None)
        elif i % 20 == 18:
            agent.update(status="terminated", terminated_at=agent["last_update"], termination_reason="killed")
        elif i % 20 == 19:
            agent.update(status="failed", terminated_at=agent["last_update"])
        else:
            agent.update(status="completed", progress=100, completed_at=agent["last_update"])
        hierarchy.setdefault(agent["parent"], []).append(agent_id)
        agents.append(agent)
    task = model.new_task_document(
        task_id, f"benchmark registry of {n_agents} agents", priority="P1", max_agents=n_agents + extra_capacity,
        max_depth=model.DEFAULT_MAX_DEPTH, max_concurrent=n_active + extra_capacity,
        workspace=f"/bench/.agent-workspace/{task_id}", workspace_base="/bench/.agent-workspace", client_cwd=None,
        now="2025-11-01T12:00:00.000000")
    task.update(agents=agents, agent_hierarchy=hierarchy)
    model.recompute_task_counters(task)
    return task


def with_active(task: dict[str, Any], n_active: int) -> dict[str, Any]:
    """A copy of *task* whose first *n_active* agents are ``working``, each of its own type (counters fixed).

    Their ``completion_validation`` blocks stay, so the sample keeps its size (about 20 KB).
    """
    task = copy.deepcopy(task)
    for i, agent in enumerate(task["agents"][:n_active]):
        for key in ("completed_at", "terminated_at", "termination_reason"):
            agent.pop(key, None)
        agent.update(status="working", progress=40, type=f"{agent['type']}_{i}")
    task["max_concurrent"] = max(task.get("max_concurrent", 0), n_active + 100)
    model.recompute_task_counters(task)
    return task


@dataclass(frozen=True)
class Workspace:
    """A workspace on disk holding one task registry and the global registry that agrees with it."""

    base: Path
    task_id: str
    task_bytes: bytes
    global_bytes: bytes

    @property
    def task_path(self) -> Path:
        return self.base / self.task_id / model.TASK_FILE

    @property
    def global_path(self) -> Path:
        return self.base / model.GLOBAL_DIR / model.GLOBAL_FILE

    @property
    def agent_ids(self) -> list[str]:
        return [a["id"] for a in orjson.loads(self.task_bytes)["agents"]]

    @property
    def active_ids(self) -> list[str]:
        return [a["id"] for a in orjson.loads(self.task_bytes)["agents"] if model.is_active(a)]

    def restore(self) -> None:
        """Put the original bytes back (not durably: this is benchmark setup, outside the timings)."""
        self.task_path.write_bytes(self.task_bytes)
        self.global_path.write_bytes(self.global_bytes)


def write_workspace(base: Path, task: dict[str, Any]) -> Workspace:
    """Write *task* under *base* as ``json.load``-able indented JSON, with the global registry that projects it."""
    task = dict(task, workspace=str(base / task["task_id"]), workspace_base=str(base))
    glob = model.new_global_document(task["created_at"])
    model.sync_global(glob, task, task["created_at"])
    ws = Workspace(base, task["task_id"], dumps(task), dumps(glob))
    ws.task_path.parent.mkdir(parents=True, exist_ok=True)
    ws.global_path.parent.mkdir(parents=True, exist_ok=True)
    ws.restore()
    return ws
