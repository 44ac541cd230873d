"""Statuses, document shapes and the invariants of a registry.  Pure functions, no I/O.

The task registries (``<base>/<TASK_ID>/AGENT_REGISTRY.json``) are the source of truth.  The global registry
(``<base>/registry/GLOBAL_REGISTRY.json``) is a view of them: :func:`project_task` says exactly what the global
registry records of one task, so keeping the two in agreement is a matter of writing that projection.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidName

ACTIVE = frozenset({"running", "working", "blocked"})
TERMINAL = frozenset({"completed", "terminated", "error", "failed"})
STATUSES = ACTIVE | TERMINAL
ORCHESTRATOR = "orchestrator"

DEFAULT_MAX_AGENTS = 45
DEFAULT_MAX_DEPTH = 5
DEFAULT_MAX_CONCURRENT = 20

TASK_FILE = "AGENT_REGISTRY.json"
GLOBAL_DIR = "registry"
GLOBAL_FILE = "GLOBAL_REGISTRY.json"

# Task statuses that no longer count as active tasks in the global totals (the samples use "INITIALIZED").
FINISHED_TASK_STATUSES = frozenset({"completed", "failed", "cancelled", "terminated", "error"})

# What the global registry mirrors of each agent; ``last_update`` is refreshed whenever the entry is written.
GLOBAL_AGENT_FIELDS = ("task_id", "type", "parent", "started_at", "tmux_session", "status")
GLOBAL_AGENT_OPTIONAL = ("completed_at", "terminated_at", "termination_reason")
# What makes an existing entry stale.  Timestamps are not compared: the old orchestrator stamped the two registries
# at different instants, and rewriting every entry of a task on each change would rewrite history it did not make.
GLOBAL_AGENT_TRACKED = ("task_id", "type", "parent", "tmux_session", "status")
GLOBAL_TASK_TRACKED = ("description", "status")

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MAX_NAME = 64


def validate_name(kind: str, value: object) -> str:
    """Return *value* if it is safe as a path component and inside a tmux session name, else raise InvalidName.

    Safe means 1 to 64 characters of letters, digits, ``_`` and ``-``, not starting with ``-`` or ``_``: no ``/``,
    ``..``, ``.``, ``:``, spaces or control characters.

    >>> validate_name("task id", "TASK-20251017-213512-5169d812")
    'TASK-20251017-213512-5169d812'
    """
    if not isinstance(value, str) or not value:
        raise InvalidName(f"{kind} must be a non-empty string, not {value!r}", kind=kind, value=value)
    if len(value) > MAX_NAME:
        raise InvalidName(f"{kind} {value[:20]!r}... is {len(value)} characters; the limit is {MAX_NAME}",
                          kind=kind, value=value)
    if not _SAFE_NAME.fullmatch(value):
        raise InvalidName(
            f"{kind} {value!r} may hold only letters, digits, '_' and '-', and must start with a letter or digit"
            " (it becomes a directory name and part of a tmux session name)",
            kind=kind, value=value)
    return value


#: What an agent id adds to its type: ``-HHMMSS-`` and 6 hex digits.
ID_SUFFIX = 14


def agent_id_prefix(agent_type: str) -> str:
    """The part of a new agent's id taken from its (valid) type: the type, cut so that the id fits MAX_NAME."""
    return agent_type[:MAX_NAME - ID_SUFFIX]


def is_valid_name(value: object) -> bool:
    """Whether :func:`validate_name` takes *value*."""
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME and _SAFE_NAME.fullmatch(value) is not None


def session_name(agent_id: str) -> str:
    """The tmux session of agent *agent_id*.  The registry only ever looks for, and kills, this name: an agent's
    ``tmux_session`` field is a record of it, never trusted (a hand-edited file could name anyone's session)."""
    return f"agent_{agent_id}"


def is_active(agent: Mapping[str, Any]) -> bool:
    return agent.get("status") in ACTIVE


# --------------------------------------------------------------------------------------------------------------------
# Projection: what the global registry holds of a task


def project_task(task: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The global registry's entry for *task* and its entries for the task's agents (``last_update`` excluded)."""
    task_id = task["task_id"]
    entry = {
        "description": task.get("task_description", ""),
        "created_at": task.get("created_at"),
        "status": task.get("status"),
    }
    agents: dict[str, dict[str, Any]] = {}
    for agent in task.get("agents", []):
        view = {"task_id": task_id}
        view.update({key: agent.get(key) for key in GLOBAL_AGENT_FIELDS if key != "task_id"})
        view.update({key: agent[key] for key in GLOBAL_AGENT_OPTIONAL if key in agent})
        agents[agent["id"]] = view
    return entry, agents


def sync_global(glob: dict[str, Any], task: Mapping[str, Any], now: str,
                archived: Callable[[], Container[str]] | None = None) -> bool:
    """Make *glob* record *task* as :func:`project_task` says, then recompute its totals.

    New entries are written whole.  An existing entry is rewritten only when a tracked field (membership, type,
    parent, session, status; a task's description and status) disagrees, so a change to one agent leaves every other
    entry byte for byte as it was; keys the projection does not name are kept.  Returns whether anything changed.

    *glob* may have moved terminal agents to its archive (:mod:`registry.archive`): a terminal agent of *task* that
    *glob* lacks is not added back when it was archived.  Its task entry counts them (``archived_agents``); when
    exactly that many terminal agents are missing they are the archived ones, else *archived* (the archived ids,
    read only then) says which.
    """
    entry, agents = project_task(task)
    _skip_archived(glob, task["task_id"], agents, archived)
    task_id = task["task_id"]
    changed = False
    tasks = glob.setdefault("tasks", {})
    old_entry = tasks.get(task_id)
    if old_entry is None:
        tasks[task_id] = entry
        changed = True
    elif any(old_entry.get(k) != entry[k] for k in GLOBAL_TASK_TRACKED):
        old_entry.update({k: entry[k] for k in GLOBAL_TASK_TRACKED})
        changed = True
    all_agents = glob.setdefault("agents", {})
    for agent_id in [a for a, view in all_agents.items() if view.get("task_id") == task_id and a not in agents]:
        del all_agents[agent_id]
        changed = True
    for agent_id, view in agents.items():
        old = all_agents.get(agent_id)
        if old is None or any(old.get(k) != view.get(k) for k in GLOBAL_AGENT_TRACKED) or any(
                (k in old) != (k in view) for k in GLOBAL_AGENT_OPTIONAL):
            kept = {k: v for k, v in (old or {}).items() if k not in GLOBAL_AGENT_OPTIONAL}
            all_agents[agent_id] = {**kept, **view, "last_update": now}
            changed = True
    return recompute_global_totals(glob) or changed


def archived_count(glob: Mapping[str, Any]) -> int:
    """How many agents the global document moved to its archive (``archived_agents``; 0 if it never did)."""
    count = glob.get("archived_agents", 0)
    return count if _is_int(count) and count > 0 else 0


def _skip_archived(glob: Mapping[str, Any], task_id: str, agents: dict[str, dict[str, Any]],
                   archived: Callable[[], Container[str]] | None) -> None:
    """Drop from *agents* (a task's projection) the terminal agents that *glob* archived (see :func:`sync_global`)."""
    entry = glob.get("tasks", {}).get(task_id)
    count = entry.get("archived_agents", 0) if isinstance(entry, dict) else 0
    if not count:
        return
    present = glob.get("agents", {})
    missing = [a for a, v in agents.items() if a not in present and v.get("status") in TERMINAL]
    if len(missing) != count and archived is not None:
        ids = archived()
        missing = [a for a in missing if a in ids]
    for agent_id in missing:
        del agents[agent_id]


def recompute_global_totals(glob: dict[str, Any]) -> bool:
    totals = {
        "total_tasks": len(glob.get("tasks", {})),
        "active_tasks": sum(1 for t in glob.get("tasks", {}).values()
                            if str(t.get("status", "")).lower() not in FINISHED_TASK_STATUSES),
        "total_agents_spawned": len(glob.get("agents", {})) + archived_count(glob),
        "active_agents": sum(1 for a in glob.get("agents", {}).values() if is_active(a)),
    }
    changed = any(glob.get(k) != v for k, v in totals.items())
    glob.update(totals)
    return changed


def finish_agent(task: dict[str, Any], agent: dict[str, Any], status: str, stamp: str, reason: str | None) -> None:
    """Move *agent* of *task* to terminal *status* at *stamp*, adjusting the task's counters exactly once."""
    was_active = agent.get("status") in ACTIVE
    agent["status"] = status
    agent["last_update"] = stamp
    if status == "completed":
        agent["completed_at"] = stamp
        task["completed_count"] = task.get("completed_count", 0) + 1
    else:
        agent["terminated_at"] = stamp
        if reason:
            agent["termination_reason"] = reason
    if was_active:
        task["active_count"] = task.get("active_count", 0) - 1


def recompute_task_counters(task: dict[str, Any]) -> dict[str, tuple[Any, int]]:
    """Set total_spawned, active_count and completed_count from the agents list; return what changed (old, new)."""
    agents = task.get("agents", [])
    want = {
        "total_spawned": len(agents),
        "active_count": sum(1 for a in agents if is_active(a)),
        "completed_count": sum(1 for a in agents if a.get("status") == "completed"),
    }
    changes = {k: (task.get(k), v) for k, v in want.items() if task.get(k) != v}
    task.update(want)
    return changes


def hierarchy_from_parents(agents: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    hierarchy: dict[str, list[str]] = {ORCHESTRATOR: []}
    for agent in agents:
        hierarchy.setdefault(agent.get("parent", ORCHESTRATOR), []).append(agent["id"])
    return hierarchy


# --------------------------------------------------------------------------------------------------------------------
# Invariants


@dataclass(frozen=True)
class Violation:
    """One broken invariant.  ``rule`` is a stable name for it; ``message`` reads on its own."""

    rule: str
    message: str
    task_id: str | None = None
    agent_id: str | None = None

    def __str__(self) -> str:
        return self.message


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a whole number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


#: Optional fields of an agent the registry reads, and the check each must pass when present.
_AGENT_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "status": (lambda v: v is None or isinstance(v, str), "a string"),
    "type": (lambda v: v is None or isinstance(v, str), "a string"),
    "parent": (lambda v: v is None or isinstance(v, str), "a string"),
    "tmux_session": (lambda v: v is None or isinstance(v, str), "a string"),
    "depth": (_is_int, "a whole number"),
    "progress": (lambda v: v is None or _is_number(v), "a number"),
}
_TASK_INTS = ("max_agents", "max_depth", "max_concurrent", "total_spawned", "active_count", "completed_count")
_TASK_STRINGS = ("task_description", "status")
_GLOBAL_INTS = ("total_tasks", "active_tasks", "total_agents_spawned", "active_agents", "max_concurrent_agents")
_VIEW_FIELDS = {key: _AGENT_FIELDS[key] for key in ("status", "type", "parent", "tmux_session")}
_VIEW_FIELDS["task_id"] = (lambda v: v is None or isinstance(v, str), "a string")


def _field_problems(where: str, doc: Mapping[str, Any],
                    checks: Mapping[str, tuple[Callable[[object], bool], str]]) -> list[str]:
    return [f"{where} has '{key}' {_kind(doc[key])}, not {want}"
            for key, (ok, want) in checks.items() if key in doc and not ok(doc[key])]


_MISSING = object()
#: The same checks as _AGENT_FIELDS, as exact types (bool is no int here), for the fast path of every read.
_AGENT_TYPES = tuple((key, frozenset(types) | {object}) for key, types in {
    "status": (str, type(None)), "type": (str, type(None)), "parent": (str, type(None)),
    "tmux_session": (str, type(None)), "depth": (int,), "progress": (int, float, type(None))}.items())


def _agent_ok(agent: object) -> bool:
    """Whether *agent* passes every check of :func:`_agent_problems` (fast: no message is built)."""
    if type(agent) is not dict or type(agent.get("id")) is not str or not agent["id"]:
        return False
    get = agent.get
    for key, types in _AGENT_TYPES:  # noqa: SIM110 (a loop: all() over a generator costs three times as much)
        if type(get(key, _MISSING)) not in types:
            return False
    return True


def _agent_problems(index: int, agent: object) -> list[str]:
    if _agent_ok(agent):
        return []
    if not isinstance(agent, dict):
        return [f"agents[{index}] is {_kind(agent)}, not an object with a string 'id'"]
    agent_id = agent.get("id")
    if not isinstance(agent_id, str) or not agent_id:
        return [f"agents[{index}] is not an object with a string 'id'"]
    return _field_problems(f"agent {agent_id!r}", agent, _AGENT_FIELDS)


def _hierarchy_problems(hierarchy: object) -> list[str]:
    if not isinstance(hierarchy, dict):
        return [f"'agent_hierarchy' is {_kind(hierarchy)}, not an object"]
    return [f"agent_hierarchy[{parent!r}] is not a list of agent ids" for parent, children in hierarchy.items()
            if not isinstance(children, list) or not all(isinstance(c, str) for c in children)]


def task_shape_problems(doc: object, task_id: str | None = None) -> list[str]:
    """What is wrong with the shape or the types of a task document, or nothing.  Used to refuse a file before
    trusting it: every field the registry reads is checked.  *task_id*: the id the document must hold (the name of
    its directory)."""
    if not isinstance(doc, dict):
        return [f"the document is a JSON {type(doc).__name__}, not an object"]
    problems = []
    if not isinstance(doc.get("task_id"), str):
        problems.append("'task_id' is missing or not a string")
    elif task_id is not None and doc["task_id"] != task_id:
        problems.append(f"'task_id' is {doc['task_id']!r}, but the file is the registry of task {task_id} (the"
                        " name of its directory)")
    agents = doc.get("agents")
    if not isinstance(agents, list):
        problems.append("'agents' is missing or not a list")
    else:
        for index, agent in enumerate(agents):
            problems += _agent_problems(index, agent)
    if "agent_hierarchy" in doc:
        problems += _hierarchy_problems(doc["agent_hierarchy"])
    problems += [f"'{key}' is {_kind(doc[key])}, not a whole number" for key in _TASK_INTS
                 if key in doc and not _is_int(doc[key])]
    problems += [f"'{key}' is {_kind(doc[key])}, not a string" for key in _TASK_STRINGS
                 if doc.get(key) is not None and not isinstance(doc[key], str)]
    return problems


def global_shape_problems(doc: object) -> list[str]:
    """What is wrong with the shape or the types of the global document, or nothing."""
    if not isinstance(doc, dict):
        return [f"the document is a JSON {type(doc).__name__}, not an object"]
    problems = []
    for key in ("tasks", "agents"):
        value = doc.get(key)
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            problems.append(f"'{key}' is missing or not an object of objects")
        elif key == "agents":
            for agent_id, view in value.items():
                problems += _field_problems(f"agents[{agent_id!r}]", view, _VIEW_FIELDS)
        else:
            problems += [f"tasks[{task_id!r}] has '{k}' {_kind(entry[k])}, not a string" for task_id, entry in
                         value.items() for k in ("description", "status")
                         if entry.get(k) is not None and not isinstance(entry[k], str)]
    problems += [f"'{key}' is {_kind(doc[key])}, not a whole number" for key in _GLOBAL_INTS
                 if key in doc and not _is_int(doc[key])]
    return problems


def task_violations(task: Mapping[str, Any]) -> list[Violation]:
    """Every invariant of one task registry that does not hold.

    Counters agree with the agents list, ids are unique, parents exist and agent_hierarchy matches them, depth is
    parent depth + 1 and within max_depth, and the active and total counts are within max_concurrent and max_agents.
    """
    tid = task.get("task_id")
    out: list[Violation] = []
    agents = task.get("agents", [])

    def v(rule: str, message: str, agent_id: str | None = None) -> None:
        out.append(Violation(rule, f"{tid}: {message}", tid, agent_id))

    actual = {
        "total_spawned": len(agents),
        "active_count": sum(1 for a in agents if is_active(a)),
        "completed_count": sum(1 for a in agents if a.get("status") == "completed"),
    }
    for key, value in actual.items():
        if task.get(key) != value:
            v("count_drift", f"{key} is {task.get(key)!r} but the agents list gives {value}")

    ids = Counter(a.get("id") for a in agents)
    for agent_id, n in ids.items():
        if n > 1:
            v("duplicate_id", f"agent id {agent_id} appears {n} times", agent_id)

    by_id = {a.get("id"): a for a in agents}
    for agent in agents:
        aid, status = agent.get("id"), agent.get("status")
        if status not in STATUSES:
            v("unknown_status", f"agent {aid} has unknown status {status!r}", aid)
        parent = agent.get("parent", ORCHESTRATOR)
        want_depth: int | None
        if parent == ORCHESTRATOR:
            want_depth = 1
        elif parent in by_id:
            parent_depth = by_id[parent].get("depth")
            want_depth = parent_depth + 1 if isinstance(parent_depth, int) else None
        else:
            v("broken_hierarchy", f"agent {aid} has parent {parent!r}, which is not an agent of the task", aid)
            want_depth = None
        if want_depth is not None and agent.get("depth") != want_depth:
            v("wrong_depth", f"agent {aid} has depth {agent.get('depth')!r}, its parent gives {want_depth}", aid)
        max_depth = task.get("max_depth", DEFAULT_MAX_DEPTH)
        if isinstance(agent.get("depth"), int) and agent["depth"] > max_depth:
            v("max_depth", f"agent {aid} is at depth {agent['depth']}, over max_depth {max_depth}", aid)

    hierarchy = task.get("agent_hierarchy")
    if hierarchy is not None:
        want = {p: sorted(c) for p, c in hierarchy_from_parents(agents).items() if c}
        have = {p: sorted(c) for p, c in hierarchy.items() if c}
        if want != have:
            missing = sorted({(p, c) for p, cs in want.items() for c in cs} - {(p, c) for p, cs in have.items()
                                                                              for c in cs})
            extra = sorted({(p, c) for p, cs in have.items() for c in cs} - {(p, c) for p, cs in want.items()
                                                                            for c in cs})
            v("broken_hierarchy", f"agent_hierarchy disagrees with the parents: missing {missing}, extra {extra}")

    max_concurrent = task.get("max_concurrent", DEFAULT_MAX_CONCURRENT)
    if actual["active_count"] > max_concurrent:
        v("max_concurrent", f"{actual['active_count']} agents are active, over max_concurrent {max_concurrent}")
    max_agents = task.get("max_agents", DEFAULT_MAX_AGENTS)
    if len(agents) > max_agents:
        v("max_agents", f"{len(agents)} agents were spawned, over max_agents {max_agents}")
    return out


def global_violations(glob: Mapping[str, Any], tasks: Mapping[str, Mapping[str, Any]], *,
                      complete: bool = True) -> list[Violation]:
    """Where the global registry disagrees with the task registries *tasks* (task id -> document).

    With *complete* (the default) *tasks* is every task of the workspace, so the global registry must hold nothing
    else and its totals must equal the sums; otherwise only the given tasks are compared.
    """
    out: list[Violation] = []
    g_agents: Mapping[str, Mapping[str, Any]] = glob.get("agents", {})
    seen: set[str] = set()
    for task_id, task in tasks.items():
        _entry, agents = project_task(task)
        if task_id not in glob.get("tasks", {}):
            out.append(Violation("global_divergence", f"the global registry has no entry for task {task_id}",
                                 task_id))
        for agent_id, view in agents.items():
            seen.add(agent_id)
            have = g_agents.get(agent_id)
            if have is None:
                out.append(Violation("global_divergence",
                                     f"agent {agent_id} of task {task_id} is missing from the global registry",
                                     task_id, agent_id))
                continue
            diffs = [f"{k} {have.get(k)!r} (task says {view.get(k)!r})" for k in ("task_id", "type", "status",
                                                                               "parent") if have.get(k) != view.get(k)]
            if diffs:
                out.append(Violation("global_divergence",
                                     f"the global registry has agent {agent_id} with " + ", ".join(diffs),
                                     task_id, agent_id))
    for agent_id, have in g_agents.items():
        if agent_id not in seen and (complete or have.get("task_id") in tasks):
            out.append(Violation("global_divergence",
                                 f"the global registry has agent {agent_id} that task {have.get('task_id')} lacks",
                                 have.get("task_id"), agent_id))
    if not complete:
        return out
    spawned = sum(len(t.get("agents", [])) for t in tasks.values())
    active = sum(1 for t in tasks.values() for a in t.get("agents", []) if is_active(a))
    if glob.get("total_agents_spawned") != spawned:
        out.append(Violation("global_count_drift",
                             f"global total_agents_spawned is {glob.get('total_agents_spawned')!r}, the tasks sum to"
                             f" {spawned}"))
    if glob.get("active_agents") != active:
        out.append(Violation("global_count_drift",
                             f"global active_agents is {glob.get('active_agents')!r}, the tasks sum to {active}"))
    return out


def new_task_document(task_id: str, description: str, *, priority: str, max_agents: int, max_depth: int,
                      max_concurrent: int, workspace: str, workspace_base: str, client_cwd: str | None,
                      now: str) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "task_description": description,
        "created_at": now,
        "workspace": workspace,
        "workspace_base": workspace_base,
        "client_cwd": client_cwd,
        "status": "INITIALIZED",
        "priority": priority,
        "agents": [],
        "agent_hierarchy": {ORCHESTRATOR: []},
        "max_agents": max_agents,
        "max_depth": max_depth,
        "max_concurrent": max_concurrent,
        "total_spawned": 0,
        "active_count": 0,
        "completed_count": 0,
    }


def new_global_document(now: str, max_concurrent_agents: int = DEFAULT_MAX_CONCURRENT) -> dict[str, Any]:
    return {
        "created_at": now,
        "total_tasks": 0,
        "active_tasks": 0,
        "total_agents_spawned": 0,
        "active_agents": 0,
        "max_concurrent_agents": max_concurrent_agents,
        "tasks": {},
        "agents": {},
    }
